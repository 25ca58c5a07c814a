"""SafeDIG's TopK SAE training next to EleutherAI sparsify's `SparseCoder`, on the same data.

Both train a TopK SAE of the same width, latents and k on the same batches of a planted-feature set (each row
a sparse sum of random unit directions plus noise, the shape of a DiT's residual stream at small scale), with
Adam at the same learning rate and the same AuxK weight; sparsify's step is its own Trainer's (forward with
the dead mask, `remove_gradient_parallel_to_decoder_directions`, unit-norm decoder after the step). It prints,
measured side by side in one run (the two alternate, each timed `--repeats` times, median kept, so that other
load on the machine shifts both alike): tokens per second of each and their ratio (goal ≥ 1.0), and the
held-out FVU of each after the same number of tokens (goal: SafeDIG's no worse).

    python benchmarks/sae_training.py            # width 512, 8192 latents, k 32, 300 steps of 2048 (~3 min, 2 cores)
    python benchmarks/sae_training.py --quick    # smoke run in seconds
    python benchmarks/sae_training.py --device cuda --dtype bfloat16   # on a GPU
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
from safedig_core.pipeline.data import MemorySource
from safedig_core.pipeline.metrics import sae_quality
from safedig_core.pipeline.train import TrainConfig, train_sae


def planted(n: int, d: int, features: int, active: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(features, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(features, generator=g)[:active] for _ in range(n)])
    mag = torch.rand(n, active, generator=g) * 2 + 0.5
    x = torch.zeros(n, d)
    for j in range(active):
        x += mag[:, j:j + 1] * dirs[idx[:, j]]
    return x + 0.05 * torch.randn(n, d, generator=g)


def batches(x: torch.Tensor, batch: int, steps: int) -> list[torch.Tensor]:
    out, i = [], 0
    while len(out) < steps:
        if i + batch > len(x):
            i = 0
        out.append(x[i:i + batch])
        i += batch
    return out


def run_safedig(data: list[torch.Tensor], latents: int, k: int, device: str) -> tuple[float, object]:
    cfg = TrainConfig(latents=latents, k=k, steps=len(data), batch_size=len(data[0]), lr_decay_start=1.0,
                      scale_batches=1, shuffle=False, log_every=10 ** 9, checkpoint_every=10 ** 9,
                      dead_tokens=len(data[0]) * 8)
    t = time.perf_counter()
    res = train_sae(lambda epoch: data, cfg, device=device)
    return time.perf_counter() - t, res.sae


def run_sparsify(data: list[torch.Tensor], latents: int, k: int, device: str, dtype) -> tuple[float, object]:
    if not device.startswith("cuda"):
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU; the eager one is its CPU path
    from sparsify import SparseCoder, SparseCoderConfig

    d = data[0].shape[1]
    sae = SparseCoder(d, SparseCoderConfig(num_latents=latents, k=k), device=device, dtype=dtype)
    sae.b_dec.data = data[0].mean(0).to(device, dtype)  # as its Trainer does on the first batch
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (latents / 2 ** 14) ** 0.5, eps=6.25e-10)
    since_fired = torch.zeros(latents, dtype=torch.long, device=device)
    threshold = len(data[0]) * 8
    t = time.perf_counter()
    for x in data:
        x = x.to(device, dtype)
        out = sae(x, dead_mask=since_fired > threshold)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            sae.set_decoder_norm_to_unit_norm()
            fired = torch.zeros(latents, dtype=torch.bool, device=device)
            fired[out.latent_indices.flatten()] = True
            since_fired += len(x)
            since_fired[fired] = 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, sae


@torch.no_grad()
def sparsify_fvu(sae, x: torch.Tensor, device: str, dtype) -> float:
    err = total = 0.0
    for chunk in x.split(4096):
        c = chunk.to(device, dtype)
        out = sae(c)
        err += float((c - out.sae_out).float().pow(2).sum())
        total += float((c.float() - x.mean(0).to(device)).pow(2).sum())
    return err / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--latents", type=int, default=8192)
    ap.add_argument("-k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="sparsify's parameter dtype")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.width, args.latents, args.batch, args.steps, args.repeats = 64, 512, 256, 20, 1
    dtype = getattr(torch, args.dtype)
    x = planted(args.batch * min(args.steps, 64) + 8192, args.width, args.latents // 2, 16, seed=0)
    train, held = x[:-8192], x[-8192:]
    data = batches(train, args.batch, args.steps)
    tokens = args.batch * args.steps
    times = {"safedig": [], "sparsify": []}
    for _ in range(args.repeats):  # alternate, so that load on a shared machine hits both alike
        torch.manual_seed(0)
        t, ours = run_safedig(data, args.latents, args.k, args.device)
        times["safedig"].append(t)
        torch.manual_seed(0)
        t, theirs = run_sparsify(data, args.latents, args.k, args.device, dtype)
        times["sparsify"].append(t)
    ours_fvu = sae_quality(ours, MemorySource(held), batch_size=4096)["fvu"]
    theirs_fvu = sparsify_fvu(theirs, held, args.device, dtype)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    result = {"width": args.width, "latents": args.latents, "k": args.k, "batch": args.batch, "steps": args.steps,
              "tokens": tokens, "device": args.device, "threads": torch.get_num_threads(),
              "tokens_per_s": tps, "ratio_tokens_per_s": tps["safedig"] / tps["sparsify"],
              "heldout_fvu": {"safedig": ours_fvu, "sparsify": theirs_fvu}}
    print(f"width {args.width}, {args.latents} latents, k {args.k}, {args.steps} steps of {args.batch} "
          f"({tokens} tokens), {args.device}, {torch.get_num_threads()} threads")
    print(f"tokens/s   SafeDIG {tps['safedig']:.0f}   sparsify {tps['sparsify']:.0f}   "
          f"ratio {result['ratio_tokens_per_s']:.2f} (goal ≥ 1.0)")
    print(f"held-out FVU   SafeDIG {ours_fvu:.4f}   sparsify {theirs_fvu:.4f}   (goal: SafeDIG no worse)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
