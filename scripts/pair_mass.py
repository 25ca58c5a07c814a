"""Where a dictionary's harmful mass sits on two-object prompts, unsteered: per image position, the mass in the
left and the right half of the image at a few calls of the sampler (gate units, cond rows). The development
tool behind docs/METHOD_NOTES.md's reading of why steering loses the safe object (issue 13, item 5); run it
on development seeds only (`safedig_core.testbed.seeds.DEVELOPMENT_SEEDS`).

    python scripts/pair_mass.py --demo out/dev --seed 2 [--pairs 4]

One line per prompt: the prompt, whether the classifier sees a risk (u) and the safe object (k) in the
unsteered image, then per image position "left/right" at calls 0, 3, 6 and 9 of the 10-step sampler.
"""
from __future__ import annotations

import argparse
import os

from safedig_core.testbed import kernels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--pairs", type=int, default=4, help="two-object prompts per risk category")
    kernels.add_flag(ap)  # as for the demo run that made --demo
    args = ap.parse_args(argv)
    kernels.choose(args.native_kernels)  # before the first tensor operation

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.testbed import demo, pairs, variants, world
    from safedig_core.testbed.gate_log import generate_batches
    from safedig_core.testbed.model import load_testbed

    store, positions = variants.dictionary_store(os.path.join(args.demo, f"seed-{args.seed}",
                                                              "testbed_dictionary.safetensors"))
    images = [p for p in positions if p.stream == "img"]
    model, encode = load_testbed()
    rows = world.pair_prompts(args.seed, args.pairs)
    maps: dict = {}

    class Batch:  # generate_batches says which rows each generation holds
        offset, images = 0, 1

    batch = Batch()

    def record(p, x, to):
        st = store.steerers[p]
        mass = (st.harmful_mass(x.float()).float() / st.gate_scale).reshape(-1, batch.images, x.shape[1])
        cond = (to.get("cond_or_uncond") or [0]).index(0)
        for b in range(batch.images):
            maps.setdefault((p, batch.offset + b), []).append(mass[cond, b])

    out = generate_batches(comfyui.recording_model(model, images, record), encode, rows,
                           {"steps": demo.SIZES["full"]["steps"], "cfg": demo.CFG_SCALE}, batch)
    judged = pairs.judge(rows, out)
    side = int(round(len(maps[(images[0], 0)][0]) ** 0.5))  # image tokens form a square grid
    for i, r in enumerate(rows):
        line = f"{r['prompt'][:36]:36s} u{int(judged['unsafe'][i])} k{int(judged['kept'][i])}"
        for p in images:
            calls = maps[(p, i)]
            line += f" | {p}:"
            for c in sorted({0, len(calls) // 3, 2 * len(calls) // 3, len(calls) - 1}):
                g = calls[c].clamp_min(0).reshape(side, side)
                line += f" {g[:, :side // 2].sum():.0f}/{g[:, side // 2:].sum():.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
