"""SafeDIG's `focus` (steer only a flagged image's tokens near its largest harmful mass) on one finished seed of
`safedig demo`: the development tool behind the two-object measurements in docs/METHOD_NOTES.md (issue 13,
item 5). Run it on development seeds only (`safedig_core.testbed.seeds.DEVELOPMENT_SEEDS`).

    python scripts/pair_focus.py --demo out/dev --seed 0 [--focus 0,0.25,0.35,0.5] [--pairs 8]

It takes that seed's dictionary and its operating τ (`seed_result.json`), and prints, unsteered and at each
focus: the unsafe rate and safe-object recall on the two-object prompts (`world.pair_prompts`) and, on the
single-object evaluation prompts of the default size, the unsafe rates, safe fidelity and safe Δ. `--shift` adds how
far steering moved the tokens it changed, `--pictures DIR` the two-object images. `scripts/pair_region.py` and
`scripts/pair_fill.py` run through `main` with steerers of their own.
"""
from __future__ import annotations

import argparse
import json
import os

from safedig_core.testbed import kernels


def _setting(text: str) -> dict:
    """"focus=0.5,apply_to=cond" → SteeringConfig changes, each value typed as the field's default is."""
    import dataclasses

    from safedig_core.steering import SteeringConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SteeringConfig)}
    out = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in defaults:
            raise argparse.ArgumentTypeError(f"--config {text!r}: {key!r} is not a SteeringConfig field "
                                             f"({', '.join(defaults)})")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


SHIFTS: dict | None = None  # with --shift: position name -> [relative shifts of the tokens each call steered]


def _logging_shifts(steerer, name: str):
    """`steerer` whose `steer` also records ‖x' − x‖ / ‖x‖ of every token it changes under `name` in SHIFTS (an
    instance attribute, so that whatever chose and edited the tokens, SafeDIG or a script's own steerer, is measured)."""
    if getattr(steerer, "_logs_shifts", False):
        return steerer
    inner = steerer.steer

    def steer(x, cfg, rows=None, flagged=None):
        out = inner(x, cfg, rows, flagged)
        if SHIFTS is not None and out is not x:
            a, b = x.reshape(-1, x.shape[-1]).float(), out.reshape(-1, x.shape[-1]).float()
            changed = (a != b).any(-1)
            rel = (b - a)[changed].norm(dim=-1) / a[changed].norm(dim=-1).clamp_min(1e-12)
            SHIFTS.setdefault(name, []).append(rel.cpu())
        return out

    steerer.steer, steerer._logs_shifts = steer, True
    return steerer


def steered_model(model, store, acting, cfg):
    """The model steered by one setting, as Apply Steering patches it; `scripts/pair_region.py` and `pair_fill.py`
    pass their own steerers through here too."""
    from safedig_core.adapters.comfy import runtime as comfyui

    if SHIFTS is not None:
        for p, st in store.steerers.items():
            _logging_shifts(st, str(p))
    return comfyui.steer_model(model, store, acting, cfg)


def _shift_line() -> str:
    import torch

    parts = []
    for name, rels in sorted(SHIFTS.items()):
        r = torch.cat(rels)
        q = torch.quantile(r, torch.tensor([0.5, 0.9])).tolist() if r.numel() else [float("nan")] * 2
        parts.append(f"{name} median {q[0]:.2f} p90 {q[1]:.2f} ({r.numel()} tokens)")
    return "    steered tokens' ‖Δx‖/‖x‖: " + ("; ".join(parts) or "none steered")


def demo_seed(demo_dir: str, seed: int):
    """(τ, store, positions, SteeringConfig) of one finished seed of `safedig demo`: its dictionary, loaded, and
    SafeDIG's setting at its operating τ, as the demo steers."""
    from safedig_core.testbed import demo, variants

    seed_dir = os.path.join(demo_dir, f"seed-{seed}")
    with open(os.path.join(seed_dir, demo.SEED_RESULT)) as f:
        tau = json.load(f)["result"]["variants"]["steered"]["operating"]["value"]
    store, positions = variants.dictionary_store(os.path.join(seed_dir, "testbed_dictionary.safetensors"))
    return tau, store, positions, variants.with_detector(demo.STEER.with_(threshold=tau), positions)


def figures_line(two, two_images, one=None, one_images=None, plain=None) -> str:
    """The two-object prompts' unsafe rate and safe-object recall and, given the one-object prompts' images and their
    unsteered ones, those prompts' unsafe rates, safe fidelity and safe Δ, on one line."""
    from safedig_core.testbed import pairs, sweep

    j = pairs.judge(two, two_images)
    line = f"two-object UR {j['unsafe'].mean():.3f} recall {j['kept'].mean():.3f}"
    if one_images is not None:
        f = sweep.figures(one, sweep.judge(one, one_images, plain))
        ur = f["unsafe_rate"]
        line += (f" | one-object UR source {ur['source']:.3f} target {ur['target']:.3f} fidelity "
                 f"{f['safe_fidelity']:.3f} safe Δ {f['safe_change']:.4f}")
    return line


def main(argv=None, description: str | None = None, add_arguments=None, make_steer=None) -> None:
    """`add_arguments(parser)` adds a script's own flags; `make_steer(args)` returns its `steer(model, store, acting,
    cfg)` (default: `steered_model`, SafeDIG's own)."""
    global SHIFTS
    ap = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--focus", default="0,0.25,0.35,0.5", help="comma list of focus values in [0, 1]")
    ap.add_argument("--config", action="append", default=[], metavar="FIELD=V,...", type=_setting,
                    help="instead of --focus: one steering setting to measure, SteeringConfig fields over the demo's "
                    "(e.g. focus=0.5,start=0.3); repeat for more")
    ap.add_argument("--pairs", type=int, default=8, help="two-object prompts per risk category")
    ap.add_argument("--act", default="", help="comma list of the dictionary's positions to steer at (default: all; "
                    "the decision is still made where the demo makes it)")
    ap.add_argument("--shift", action="store_true",
                    help="also print, per setting and position, how far steering moved the tokens it changed "
                         "(‖Δx‖/‖x‖, median and 90th percentile over every token and call of the two-object prompts)")
    ap.add_argument("--pictures", default="", metavar="DIR",
                    help="also draw each setting's two-object images, unsteered | steered, to DIR/<setting>.png")
    kernels.add_flag(ap)  # as for the demo run that made --demo
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    kernels.choose(args.native_kernels)  # before the first tensor operation
    steer = make_steer(args) if make_steer is not None else steered_model
    settings = args.config or [{"focus": float(v)} for v in args.focus.split(",") if v.strip()]

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.testbed import demo, pictures, sweep, world
    from safedig_core.testbed.model import load_testbed

    tau, store, positions, base = demo_seed(args.demo, args.seed)
    acting = [p for p in positions if not args.act or str(p) in args.act.split(",")]
    model, encode = load_testbed()
    gen = dict(steps=demo.SIZES["full"]["steps"], cfg=demo.CFG_SCALE)
    two = world.pair_prompts(args.seed, args.pairs)
    one = world.prompt_sets(args.seed, **demo.SIZES["full"]["sets"])["eval"]
    plain = sweep.generate_rows(model, encode, one, gen)

    def show(name, two_images, one_images):
        print(f"{name:24s} " + figures_line(two, two_images, one, one_images, plain), flush=True)

    print(f"seed {args.seed}, τ {tau}, {len(two)} two-object and {len(one)} one-object prompts, "
          f"positions {[p.name for p in positions]}, acting at {[p.name for p in acting]}")
    plain_two = sweep.generate_rows(model, encode, two, gen)
    show("unsteered", plain_two, plain)
    if args.pictures:
        os.makedirs(args.pictures, exist_ok=True)
    for changes in settings:
        name = " ".join(f"{k} {v}" for k, v in changes.items())
        SHIFTS = {} if args.shift else None
        m = steer(model, store, acting, base.with_(**changes))
        steered_two = sweep.generate_rows(m, encode, two, gen)
        line = _shift_line() if args.shift else ""
        SHIFTS = None
        show(name, steered_two, sweep.generate_rows(m, encode, one, gen))
        if line:
            print(line, flush=True)
        if args.pictures:
            path = os.path.join(args.pictures, "_".join(f"{k}-{v}" for k, v in changes.items()) + ".png")
            pictures.grid(two, plain_two, steered_two, path, per_group=8, groups=pictures.PAIR_GROUPS)
            print(f"    picture: {path}", flush=True)


if __name__ == "__main__":
    main()
