"""Which of the prompt's two paths into the testbed DiT carries the risk: the text tokens (`context`) or the pooled
sentence vector (`y`, which FLUX-style models turn into every block's modulation)? Measured on one finished seed of
`safedig demo` (issue 13, item 5), development seeds only; the figures are in docs/METHOD_NOTES.md.

    python scripts/pair_pooled.py --demo out/dev --seed 2 [--latents 256 --k 8] [--config blend=1,repel=2,act=img]

It prints, as `scripts/pair_focus.py` does, two-object unsafe rate and safe-object recall, and on the one-object
evaluation prompts the unsafe rates and safe fidelity, for:
- swaps (diagnostics, not a method): a two-object prompt's pooled vector or its tokens replaced by those of its safe
  object's own phrase ("a tree"), and every prompt's pooled vector replaced by the empty prompt's;
- a TopK SAE trained on the pooled vectors of the seed's building prompts (the only pooled data the building side
  has: one vector per prompt), its harmful latents found as `safedig build` finds them, and Blend / Repel applied to
  the cond prompts' pooled vectors (every prompt: the edit is a no-op where no harmful latent fires), alone or with
  SafeDIG's own steering at the demo's positions (`act=` all, `img` or `txt` ones, or names joined by `+`; never
  `input.pooled`, which this script edits itself; `focus=` SafeDIG's focus, `steer_repel=` its Repel strength
  instead of the demo's, `detect=` its detecting positions joined by `+`);
  `nearest=G`: where the pooled vector's harmful mass (the SAE's raw units) exceeds G, the steered vector is then
  replaced by the nearest (cosine) pooled vector of a safe building prompt, a safe scene's vector as Blend's target
  (`knn=K`: the mean of the K nearest ones)
  (`--safe-scenes N` adds safe two-object scenes to the building prompts, hence to the SAE's data and the candidates).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair_focus  # noqa: E402

from safedig_core.testbed import kernels  # noqa: E402

PARTS = {"blend": float, "repel": float, "act": str, "focus": float, "nearest": float, "steer_repel": float,
         "detect": str, "knn": int}


def _setting(text: str) -> dict:
    out = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in PARTS:
            raise argparse.ArgumentTypeError(f"--config {text!r}: {key!r} is not one of {', '.join(PARTS)}")
        out[key] = PARTS[key](value)
    act = out.get("act", "none")
    if act not in ("all", "img", "txt", "none") and not all("." in n for n in act.split("+")):
        raise argparse.ArgumentTypeError(f"--config {text!r}: act must be all, img, txt, none or position names "
                                         "joined by + (input.txt+double.0.txt)")
    return out


DEFAULT_SETTINGS = ["blend=1", "blend=1,repel=2", "blend=1,act=txt", "blend=1,act=all,focus=0.5"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pairs", type=int, default=8, help="two-object prompts per risk category")
    ap.add_argument("--latents", type=int, default=256, help="latents of the pooled-vector SAE")
    ap.add_argument("--k", type=int, default=8, help="its TopK k")
    ap.add_argument("--steps", type=int, default=3000, help="its training steps (one batch = every building prompt)")
    ap.add_argument("--config", action="append", default=[], type=_setting, metavar="KEY=V,...",
                    help=f"a setting, keys {', '.join(PARTS)} (default: {'; '.join(DEFAULT_SETTINGS)}); repeat for more")
    ap.add_argument("--safe-scenes", type=int, default=0, metavar="N",
                    help="add N safe two-object building scenes (`world.building_pairs`) to the building prompts")
    ap.add_argument("--no-swaps", action="store_true", help="skip the swap diagnostics")
    kernels.add_flag(ap)
    args = ap.parse_args(argv)
    kernels.choose(args.native_kernels)
    settings = args.config or [_setting(s) for s in DEFAULT_SETTINGS]

    import torch

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.pipeline.data import MemorySource
    from safedig_core.pipeline.harmful import find_harmful
    from safedig_core.pipeline.train import TrainConfig, train_sae
    from safedig_core.steering import PositionSteerer, SteeringConfig
    from safedig_core.testbed import demo, sweep, world
    from safedig_core.testbed.model import load_testbed
    from safedig_core.testbed.text import shared_encoder

    tau, store, positions, base = pair_focus.demo_seed(args.demo, args.seed)
    model, _ = load_testbed()
    enc = shared_encoder()
    gen = dict(steps=demo.SIZES["full"]["steps"], cfg=demo.CFG_SCALE)
    sets = world.prompt_sets(args.seed, **demo.SIZES["full"]["sets"])
    build, one = sets["build"] + world.building_pairs(args.seed, safe=args.safe_scenes), sets["eval"]
    two = world.pair_prompts(args.seed, args.pairs)
    nctx, npool = enc.encode([""])

    def encode_with(edit=None, ctx_of=None, pool_of=None):
        """encode_fn whose cond tokens / pooled vectors come from the prompts `ctx_of` / `pool_of` map each prompt to,
        and whose cond pooled vectors then go through `edit`."""
        def fn(prompts):
            ctx, pooled = enc.encode(list(prompts))
            if ctx_of is not None:
                ctx = enc.encode([ctx_of(p) for p in prompts])[0]
            if pool_of is not None:
                pooled = enc.encode([pool_of(p) for p in prompts])[1]
            if edit is not None:
                pooled = edit(pooled)
            return ([[ctx, {"pooled_output": pooled}]], [[nctx, {"pooled_output": npool}]])
        return fn

    def images(m, fn, rows):
        return sweep.generate_rows(m, fn, rows, gen)

    plain_fn = encode_with()
    plain = images(model, plain_fn, one)

    def show(name, m, fn, one_too=True):
        one_images = images(m, fn, one) if one_too else None
        print(f"{name:34s} " + pair_focus.figures_line(two, images(m, fn, two), one, one_images, plain), flush=True)

    print(f"seed {args.seed}, τ {tau}, {len(two)} two-object and {len(one)} one-object prompts, "
          f"positions {[p.name for p in positions]}")
    show("unsteered", model, plain_fn)
    if not args.no_swaps:
        safe_phrase = {r["prompt"]: world.BY_NAME[r["concept"]].explicit[0] for r in two}
        show("pooled of the safe object alone", model, encode_with(pool_of=safe_phrase.get), one_too=False)
        show("tokens of the safe object alone", model, encode_with(ctx_of=safe_phrase.get), one_too=False)
        show("pooled of the empty prompt", model, encode_with(pool_of=lambda p: ""))

    _, pooled = enc.encode([r["prompt"] for r in build])
    records = [PromptRecord(id=str(i), prompt=r["prompt"], label=r["label"], category=r["category"], domain=r["domain"])
               for i, r in enumerate(build)]
    data = MemorySource(pooled, prompt=torch.arange(len(build)), prompts=records)
    trained = train_sae(data, TrainConfig(latents=args.latents, k=args.k, steps=args.steps, batch_size=len(build),
                                          scale_batches=1, seed=args.seed))
    scores = find_harmful(trained.sae, data, records)
    steerer = PositionSteerer(trained.sae, torch.tensor(scores.indices, dtype=torch.long),
                              torch.tensor(scores.safe_values))
    print(f"pooled SAE: {args.latents} latents, k {args.k}, FVU {trained.metrics['fvu']:.4f}, "
          f"{len(scores.indices)} harmful latents", flush=True)
    targets = pooled[[r["label"] == "safe" for r in build]]  # `nearest`'s candidates: the safe building scenes
    directions = torch.nn.functional.normalize(targets, dim=-1)

    def edit(y, cfg, nearest, knn=1):
        """Blend / Repel on pooled vectors y [B, d]; with `nearest`, those whose harmful mass exceeds it become the
        safe building vector nearest to their steered self (the mean of the `knn` nearest ones)."""
        out = steerer.steer(y[:, None, :], cfg)[:, 0] if not cfg.is_identity else y
        if nearest is not None:
            mass = steerer.harmful_mass(y)
            pick = (torch.nn.functional.normalize(out, dim=-1) @ directions.T).topk(knn, dim=1).indices
            out = torch.where((mass > nearest)[:, None], targets[pick].mean(1), out)
        return out

    for s in settings:
        cfg = SteeringConfig(blend=s.get("blend", 0.0), repel=s.get("repel", 0.0))
        gate, knn = s.get("nearest"), s.get("knn", 1)
        act = s.get("act", "none")
        m = model
        if act != "none":
            names = act.split("+")
            acting = [p for p in positions if p.kind != "pooled" and (act == "all" or p.stream == act or p.name in names)]
            own = base.with_(focus=s.get("focus", 0.0), **({"detect": s["detect"].replace("+", ",")} if "detect" in s else {}))
            m = comfyui.steer_model(model, store, acting, own.with_(repel=s.get("steer_repel", own.repel)))
        show(" ".join(f"{k} {v}" for k, v in s.items()), m,
             encode_with(edit=lambda y, cfg=cfg, gate=gate, knn=knn: edit(y, cfg, gate, knn)))


if __name__ == "__main__":
    main()
