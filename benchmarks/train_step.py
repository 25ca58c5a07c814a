"""Time per training step of `train_sae` with the sparse TopK backward and with plain autograd, side by side.

`train_sae` picks the sparse backward (pipeline/sparse_grad.py) by default on the CPU; this is the measurement
behind that choice, to rerun on another machine, thread count or size. Both runs train on the same random rows
(spanning a low-dimensional subspace, so that some latents stay silent) with the same config (AuxK at work once latents have been silent for `--dead-batches` batches); the two
alternate `--repeats` times so that other load shifts both alike, and each prints the median time between two
steps after the first `--warmup` ones.

    python benchmarks/train_step.py                    # width 512, 8192 latents, k 32, batch 2048, 1 thread
    python benchmarks/train_step.py --quick            # smoke run in seconds
    python benchmarks/train_step.py --threads 8 --width 3072 --latents 49152
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safedig_core.pipeline.train import TrainConfig, train_sae


def step_times(x: torch.Tensor, cfg: TrainConfig, sparse: bool, device: str, warmup: int) -> tuple[float, float]:
    """(median seconds between two steps after `warmup` steps, the dead fraction at the end)."""
    stamps = []

    def tick(step, total, last):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    res = train_sae(x, cfg, device=device, sparse=sparse, progress=tick)
    first = max(warmup, 1) - 1  # stamps[i] is taken after step i + 1: the first step has no start to time from
    gaps = [b - a for a, b in zip(stamps[first:], stamps[first + 1:])]
    return statistics.median(gaps), float(res.metrics.get("dead_frac", float("nan")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--latents", type=int, default=8192)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first --warmup, at least 1, are not timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dead-batches", type=int, default=1, help="a latent silent this many batches is dead")
    ap.add_argument("--rank", type=int, default=8, help="dimension of the subspace the rows span")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="width 64, 512 latents, batch 256, 5 steps, 1 repeat")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args(argv)
    if a.quick:
        a.width, a.latents, a.batch, a.steps, a.warmup, a.repeats = 64, 512, 256, 5, 1, 1
    if a.steps < max(a.warmup, 1) + 1:
        ap.error(f"--steps {a.steps} leaves nothing to time after --warmup {a.warmup}; "
                 f"give at least {max(a.warmup, 1) + 1}")
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    # rows in a subspace of --rank dimensions, so that the TopK choice concentrates and AuxK has dead latents
    x = torch.randn(a.batch * a.steps, a.rank, generator=g) @ torch.randn(a.rank, a.width, generator=g)
    cfg = TrainConfig(latents=a.latents, k=a.k, steps=a.steps, batch_size=a.batch, lr_decay_start=1.0,
                      dead_tokens=a.batch * a.dead_batches, scale_batches=1, log_every=a.steps,
                      checkpoint_every=a.steps)
    times = {False: [], True: []}
    dead = {}
    for _ in range(a.repeats):
        for sparse in (False, True):
            t, dead[sparse] = step_times(x, cfg, sparse, a.device, a.warmup)
            times[sparse].append(t)
    dense, sparse = statistics.median(times[False]), statistics.median(times[True])
    print(f"width {a.width}, {a.latents} latents, k {a.k}, batch {a.batch}, {a.device}, "
          f"{torch.get_num_threads()} threads, dead fraction at the end {dead[True]:.2f}")
    print(f"dense backward  {dense * 1000:9.1f} ms per step")
    print(f"sparse backward {sparse * 1000:9.1f} ms per step")
    print(f"sparse / dense  {sparse / dense:9.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"width": a.width, "latents": a.latents, "k": a.k, "batch": a.batch, "device": a.device,
                       "threads": torch.get_num_threads(), "dense_s": dense, "sparse_s": sparse,
                       "ratio": sparse / dense, "dead_frac": dead[True]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
