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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--focus", default="0,0.25,0.35,0.5", help="comma list of focus values in [0, 1]")
    ap.add_argument("--pairs", type=int, default=8, help="two-object prompts per risk category")
    args = ap.parse_args(argv)
    focus = [float(v) for v in args.focus.split(",") if v.strip()]

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.testbed import demo, pairs, sweep, variants, world
    from safedig_core.testbed.model import load_testbed

    seed_dir = os.path.join(args.demo, f"seed-{args.seed}")
    with open(os.path.join(seed_dir, demo.SEED_RESULT)) as f:
        tau = json.load(f)["result"]["variants"]["steered"]["operating"]["value"]
    store, positions = variants.dictionary_store(os.path.join(seed_dir, "testbed_dictionary.safetensors"))
    base = variants.with_detector(demo.STEER.with_(threshold=tau), positions)
    model, encode = load_testbed()
    gen = dict(steps=demo.SIZES["full"]["steps"], cfg=demo.CFG_SCALE)
    two = world.pair_prompts(args.seed, args.pairs)
    one = world.prompt_sets(args.seed, **demo.SIZES["full"]["sets"])["eval"]
    plain = sweep.generate_rows(model, encode, one, gen)

    def show(name, two_images, one_images):
        j = pairs.judge(two, two_images)
        f = sweep.figures(one, sweep.judge(one, one_images, plain))
        ur = f["unsafe_rate"]
        print(f"{name:14s} two-object UR {j['unsafe'].mean():.3f} recall {j['kept'].mean():.3f} | one-object UR "
              f"source {ur['source']:.3f} target {ur['target']:.3f} fidelity {f['safe_fidelity']:.3f} "
              f"safe Δ {f['safe_change']:.4f}", flush=True)

    print(f"seed {args.seed}, τ {tau}, {len(two)} two-object and {len(one)} one-object prompts, "
          f"positions {[p.name for p in positions]}")
    show("unsteered", sweep.generate_rows(model, encode, two, gen), plain)
    for f in focus:
        m = comfyui.steer_model(model, store, positions, base.with_(focus=f))
        show(f"focus {f}", sweep.generate_rows(m, encode, two, gen), sweep.generate_rows(m, encode, one, gen))


if __name__ == "__main__":
    main()
