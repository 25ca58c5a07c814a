"""What does collecting activations cost on top of sampling the same prompts?

Side by side in one process, on the committed testbed DiT through ComfyUI (`safedig_core.testbed.model.
load_testbed`): (a) plain sampling, `comfy.sample.sample` (the KSampler path) of every prompt with the same
noise seed, steps, cfg and latent the collection uses; (b) `safedig_core.pipeline.collect` through
`adapters/comfy/runner.ComfyRunner` of the same prompts into a fresh activation store (recording patches at
the chosen positions, token selection, shard writes, manifest). The two alternate, round after round, so that
other load on the machine hits both alike; it prints the median of each and the extra time of collecting
(goal ≤ 10 %).

    python benchmarks/collection_overhead.py              # a few minutes on 2 cores
    python benchmarks/collection_overhead.py --quick      # smoke run
    python benchmarks/collection_overhead.py --width 384 --image-size 64 --budget 256

The testbed DiT is tiny (width 96, 64 image tokens), so its blocks cost little next to the fixed cost of handing
nine positions to the recorder at every model call. `--width` and `--image-size` take instead a FLUX model of
the testbed's depth with that width and image side (patch 2: (side / 2)² image tokens), random weights: its
blocks weigh against the recording more as FLUX.1's do (width 3072, 4096 image tokens at 1024²), and what it
records is the same (the activations, not their meaning, set the cost).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safedig_core.adapters.comfy import runtime as comfyui


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--record-steps", default="0,0.25,0.5,0.75")
    ap.add_argument("--budget", type=int, default=16, help="token rows per image, position and recorded step")
    ap.add_argument("--positions", default="all")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--width", type=int, default=None,
                    help="a FLUX model of this width (heads of 64) with random weights instead of the testbed DiT")
    ap.add_argument("--image-size", type=int, default=32, help="with --width: the latent's side (patch 2)")
    ap.add_argument("--quick", action="store_true", help="2 prompts, 4 steps, 2 rounds")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.steps, a.rounds = 2, 4, 2
    if a.threads:
        torch.set_num_threads(a.threads)
    comfyui.bootstrap(cpu=True)
    import comfy.sample

    from safedig_core.adapters.comfy.runner import ComfyRunner
    from safedig_core.pipeline.collect import collect, prompt_seed
    from safedig_core.testbed import world
    from safedig_core.testbed.dictionary import records
    from safedig_core.testbed.model import load_testbed

    if a.width:
        if a.width % 64 or a.image_size % 2:
            raise SystemExit("--width must be a multiple of 64 (heads of 64) and --image-size even (patch 2)")
        from safedig_core.testbed.model import ARCH, build_model, make_encode_fn, patcher

        arch = dict(ARCH, hidden_size=a.width, num_heads=a.width // 64, patch_size=2, image_size=a.image_size)
        model, encode_fn = patcher(build_model(arch, seed=0)), make_encode_fn()
        side, name = a.image_size, f"flux-width-{a.width}"
    else:
        model, encode_fn = load_testbed()
        side, name = world.SIZE, "safedig-testbed"
    rows = world.prompt_sets(0)["build"]
    recs = records([rows[i] for i in torch.linspace(0, len(rows) - 1, a.prompts).round().long().tolist()])
    shape = (3, side, side)
    runner = ComfyRunner(model, lambda p: encode_fn([p]), cfg=a.cfg, latent_shape=shape, name=name)
    seed = 0

    def plain():
        for i, rec in enumerate(recs):  # what ComfyRunner.run does, without the recording patches
            positive, negative = runner.encode(rec.prompt)
            latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros((1,) + shape))
            s = prompt_seed(rec, i, seed)
            noise = comfy.sample.prepare_noise(latent, s)
            with torch.no_grad():
                comfy.sample.sample(model, noise, a.steps, a.cfg, runner.sampler, runner.scheduler, positive, negative,
                                    latent, denoise=1.0, callback=None, disable_pbar=True, seed=s)

    tmp = tempfile.mkdtemp(prefix="safedig-collect-bench-")
    stores = []

    def collecting():
        path = os.path.join(tmp, f"store{len(stores)}")
        stores.append(path)
        res = collect(runner, recs, a.positions, path, a.steps, a.record_steps, a.budget, seed)
        assert res.complete and res.collected == len(recs), res
        shutil.rmtree(path)

    try:
        plain(), collecting()  # warm-up
        times = {"plain": [], "collect": []}
        for _ in range(a.rounds):
            for name, fn in (("plain", plain), ("collect", collecting)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_round = [c / p - 1 for p, c in zip(times["plain"], times["collect"])]
    extra = statistics.median(per_round)
    what = (f"a width-{a.width} FLUX model ({(side // 2) ** 2} image tokens, random weights)" if a.width
            else "the testbed DiT")
    print(f"collection overhead on {what} through ComfyUI ({torch.get_num_threads()} threads): {a.prompts} "
          f"prompts, {a.steps} steps, cfg {a.cfg}, positions {a.positions} ({len(runner.layout.positions())} in the "
          f"model), record steps {a.record_steps}, {a.budget} token rows; medians of {a.rounds} alternating rounds")
    print(f"plain sampling {med['plain']:.2f} s   collecting {med['collect']:.2f} s   extra {extra:+.1%} (median of the "
          f"per-round ratios; goal ≤ 10 %)  {'ok' if extra <= 0.10 else 'ABOVE 10 %'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "seconds": times, "median_s": med, "extra": extra}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
