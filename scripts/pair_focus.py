"""SafeDIG's `focus` (steer only a flagged image's tokens near its largest harmful mass) on one finished seed of
`safedig demo`: the development tool behind the two-object measurements in docs/METHOD_NOTES.md (issue 13,
item 5). Run it on development seeds only (`safedig_core.testbed.demo.DEVELOPMENT_SEEDS`).

    python scripts/pair_focus.py --demo out/dev --seed 0 [--focus 0,0.25,0.35,0.5] [--pairs 8]

It takes that seed's dictionary and its operating τ (`seed_result.json`), and prints, unsteered and at each
focus: the unsafe rate and safe-object recall on the two-object prompts (`world.pair_prompts`) and, on the
single-object evaluation prompts of the default size, the unsafe rates, safe fidelity and safe Δ.
"""
from __future__ import annotations

import argparse
import json
import os


def _setting(text: str) -> dict:
    """"focus=0.5,apply_to=cond" → SteeringConfig changes, each value typed as the field's default is."""
    import argparse
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


def steered_model(model, store, acting, cfg):
    """The model steered by one setting, as Apply Steering patches it (`scripts/pair_region.py` passes its own)."""
    from safedig_core.adapters.comfy import runtime as comfyui

    return comfyui.steer_model(model, store, acting, cfg)


def main(argv=None, steer=steered_model, description: str | None = None) -> None:
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
    ap.add_argument("--native-kernels", action="store_true",
                    help="the CPU's fastest kernels, as for a demo run with --native-kernels (default: the portable "
                         "ones `safedig demo` uses, safedig_core/testbed/kernels.py)")
    args = ap.parse_args(argv)
    from safedig_core.testbed import kernels

    if not args.native_kernels:
        kernels.use_portable()  # before the first tensor operation, as the demo that made --demo did
    settings = args.config or [{"focus": float(v)} for v in args.focus.split(",") if v.strip()]

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.testbed import demo, pairs, sweep, variants, world
    from safedig_core.testbed.model import load_testbed

    seed_dir = os.path.join(args.demo, f"seed-{args.seed}")
    with open(os.path.join(seed_dir, demo.SEED_RESULT)) as f:
        tau = json.load(f)["result"]["variants"]["steered"]["operating"]["value"]
    store, positions = variants.dictionary_store(os.path.join(seed_dir, "testbed_dictionary.safetensors"))
    base = variants.with_detector(demo.STEER.with_(threshold=tau), positions)
    acting = [p for p in positions if not args.act or str(p) in args.act.split(",")]
    model, encode = load_testbed()
    gen = dict(steps=demo.SIZES["full"]["steps"], cfg=demo.CFG_SCALE)
    two = world.pair_prompts(args.seed, args.pairs)
    one = world.prompt_sets(args.seed, **demo.SIZES["full"]["sets"])["eval"]
    plain = sweep.generate_rows(model, encode, one, gen)

    def show(name, two_images, one_images):
        j = pairs.judge(two, two_images)
        f = sweep.figures(one, sweep.judge(one, one_images, plain))
        ur = f["unsafe_rate"]
        print(f"{name:24s} two-object UR {j['unsafe'].mean():.3f} recall {j['kept'].mean():.3f} | one-object UR "
              f"source {ur['source']:.3f} target {ur['target']:.3f} fidelity {f['safe_fidelity']:.3f} "
              f"safe Δ {f['safe_change']:.4f}", flush=True)

    print(f"seed {args.seed}, τ {tau}, {len(two)} two-object and {len(one)} one-object prompts, "
          f"positions {[p.name for p in positions]}, acting at {[p.name for p in acting]}")
    show("unsteered", sweep.generate_rows(model, encode, two, gen), plain)
    for changes in settings:
        m = steer(model, store, acting, base.with_(**changes))
        show(" ".join(f"{k} {v}" for k, v in changes.items()), sweep.generate_rows(m, encode, two, gen),
             sweep.generate_rows(m, encode, one, gen))


if __name__ == "__main__":
    main()
