"""What a real FLUX.1 Dev build costs: store bytes per prompt, measured; SAE training speed, measured on this
machine; and the store size, GPU-hours and wall time they imply for 1k, 10k and 100k prompts on 1, 8 and 64
GPUs. Every figure of docs/SCALING.md comes from this script's output.

- Store bytes: a real shard written by `StoreWriter` for FLUX.1 Dev's widths (3072) with the README's recommended
  collection settings (3 recorded steps, 256 token rows per image, position and step, float16), divided by its
  prompts: exact, not estimated.
- Training speed: `train_sae` at width 3072, 16x latents (49152), k 32, measured here for a few steps on this
  machine's device; the extrapolation to a GPU uses the FLOPs of one training step (encoder and decoder
  products, forward and backward) at an assumed fraction of the GPU's bf16 peak, printed beside the result so
  that nobody mistakes it for a measurement. Pass `--device cuda` where a GPU is lent to measure it instead.
- Collection time per prompt is the model's own sampling time (28 FLUX.1 Dev steps at 1024²), which this
  machine cannot run: it is an input (`--sample-seconds`, default 20 s on one H100/H200-class GPU), not a
  measurement of this script.

    python benchmarks/scaling.py                  # ~2 minutes on 2 cores
    python benchmarks/scaling.py --device cuda    # training speed measured on the GPU
    python benchmarks/scaling.py --memory         # device memory steering keeps per position (seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safedig_core.formats.prompts import PromptRecord
from safedig_core.formats.store import StoreWriter
from safedig_core.pipeline.train import TrainConfig, train_sae

WIDTH = 3072  # FLUX.1 Dev, every block and stream
PROMPTS = (1_000, 10_000, 100_000)
GPUS = (1, 8, 64)


def store_bytes_per_prompt(positions: int, record_steps: int, budget: int, prompts: int = 4) -> dict:
    """Bytes of one shard of `prompts` prompts with FLUX widths, per prompt and per position (measured)."""
    names = [f"double.{i}.img" for i in range(positions)]
    recs = [PromptRecord(f"p{i}", f"prompt {i}", "safe", "", "source") for i in range(prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        with StoreWriter(path, "flux", names, {n: WIDTH for n in names}, recs, {"steps": 28},
                         prompts_per_shard=prompts) as w:
            g = torch.Generator().manual_seed(0)
            for i in range(prompts):
                steps = torch.arange(record_steps, dtype=torch.int32).repeat_interleave(budget)
                rows = {n: (torch.randn(budget * record_steps, WIDTH, generator=g), steps,
                            torch.arange(budget).repeat(record_steps)) for n in names}
                pooled = {n: (torch.randn(record_steps, WIDTH, generator=g), torch.arange(record_steps)) for n in names}
                w.add(i, rows, pooled)
        shard = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.startswith("shard-"))
    return {"per_prompt": shard / prompts, "per_prompt_per_position": shard / prompts / positions}


def training_tokens_per_s(device: str, latents: int, k: int, batch: int, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(batch, WIDTH, generator=g) for _ in range(steps + 1)]
    cfg = TrainConfig(latents=latents, k=k, steps=1, batch_size=batch, scale_batches=1, shuffle=False,
                      log_every=10 ** 9, checkpoint_every=10 ** 9)
    train_sae(lambda e: data[:1], cfg, device=device)  # warm-up: allocation, kernels
    cfg = TrainConfig(latents=latents, k=k, steps=steps, batch_size=batch, scale_batches=1, shuffle=False,
                      log_every=10 ** 9, checkpoint_every=10 ** 9)
    t = time.perf_counter()
    train_sae(lambda e: data[1:], cfg, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def steering_memory(width: int, expansion: int = 16, k: int = 32, harmful: int = 32,
                    dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes steering keeps on the device for one position, from the objects themselves (built on the meta
    device, no memory used): the encoder-side working copy ComfyUI counts (`PositionSteerer.hold`, sized as
    `comfy.model_management.module_size` sizes a module), and what stays outside that count (harmful decoder
    rows and their Gram matrix, the fast gate's screen rows)."""
    from safedig_core import fast_gate
    from safedig_core.sae import SparseAutoencoder
    from safedig_core.steering import PositionSteerer

    with torch.device("meta"):
        sae = SparseAutoencoder(width, expansion * width, k)
        st = PositionSteerer(sae, torch.arange(harmful))
        held = st.hold("meta", dtype)
        _, _, D_H, gram, _ = st._derived(torch.device("meta"), dtype)
    counted = sum(t.nelement() * t.element_size() for t in held.state_dict().values())
    screen_rows = harmful + fast_gate.default_probes(sae)  # fast_gate.Screen: rows, biases, norms in float32
    outside = sum(t.nelement() * t.element_size() for t in (D_H, gram)) + screen_rows * (width + 2) * 4
    return {"width": width, "latents": expansion * width, "harmful": harmful, "dtype": str(dtype),
            "counted_bytes": counted, "outside_bytes": outside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--positions", type=int, default=3, help="routed positions (the README recommends 3)")
    ap.add_argument("--record-steps", type=int, default=3)
    ap.add_argument("--budget", type=int, default=256, help="token rows per image, position and recorded step")
    ap.add_argument("--train-tokens", type=float, default=50e6, help="SAE training tokens per position")
    ap.add_argument("--sample-seconds", type=float, default=20.0,
                    help="seconds one GPU takes to sample one FLUX.1 Dev image (28 steps, 1024²): an input")
    ap.add_argument("--gpu-tflops", type=float, default=790.0, help="bf16 dense peak of the GPU (H200: ~790)")
    ap.add_argument("--utilisation", type=float, default=0.35, help="assumed fraction of that peak in training")
    ap.add_argument("--steps", type=int, default=2, help="training steps measured")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", default=None)
    ap.add_argument("--memory", action="store_true",
                    help="only the device memory steering keeps per position, FLUX.1 (3072) and SD3.5 Large (2432)")
    args = ap.parse_args()
    if args.memory:
        rows = [steering_memory(w) for w in (WIDTH, 2432)]
        for name, r in zip(("FLUX.1", "SD3.5 Large"), rows):
            print(f"{name} width {r['width']}, 16x ({r['latents']} latents), {r['dtype'].split('.')[-1]}: "
                  f"{r['counted_bytes'] / 2**30:.3f} GiB per position counted by ComfyUI (encoder side), "
                  f"+{r['outside_bytes'] / 2**20:.1f} MiB outside it ({r['harmful']} harmful latents; fast gate "
                  "screen included)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    latents, k = 16 * WIDTH, 32
    size = store_bytes_per_prompt(args.positions, args.record_steps, args.budget)
    measured = training_tokens_per_s(args.device, latents, k, args.batch, args.steps)
    # one step per token: encoder (2·d·L) forward + 2x backward; sparse decode is negligible beside it
    flops_per_token = 3 * 2 * WIDTH * latents
    gpu_tps = measured if args.device.startswith("cuda") else args.gpu_tflops * 1e12 * args.utilisation / flops_per_token
    rows = []
    for n in PROMPTS:
        for gpus in GPUS:
            collect_h = n * args.sample_seconds / 3600  # GPU-hours
            train_h = args.positions * args.train_tokens / gpu_tps / 3600
            wall_h = collect_h / gpus + train_h / min(gpus, args.positions)  # positions dealt over ranks
            rows.append({"prompts": n, "gpus": gpus, "store_GB": n * size["per_prompt"] / 1e9,
                         "gpu_hours": collect_h + train_h, "wall_hours": wall_h})
    result = {"store_bytes": size, "train_tokens_per_s_measured": measured, "device": args.device,
              "threads": torch.get_num_threads(), "gpu_tokens_per_s": gpu_tps,
              "gpu_tokens_per_s_is": "measured" if args.device.startswith("cuda") else
              f"FLOP estimate: {args.gpu_tflops} TFLOP/s x {args.utilisation} / {flops_per_token:.3g} FLOP per token",
              "inputs": vars(args), "table": rows}
    print(f"store: {size['per_prompt'] / 1e6:.2f} MB per prompt ({size['per_prompt_per_position'] / 1e6:.2f} MB per "
          f"position; {args.positions} positions, {args.record_steps} steps, {args.budget} rows, float16) - measured")
    every = 2 * (19 + 38) - 1  # FLUX.1 Dev: both streams of every block but the last single block's text
    pooled = store_bytes_per_prompt(1, args.record_steps, 0)["per_prompt_per_position"]
    print(f"every FLUX.1 position ({every}) at that budget: {every * size['per_prompt_per_position'] / 1e6:.0f} MB per "
          f"prompt; pooled means only (--token-budget 0): {pooled / 1e3:.0f} KB per prompt and position - measured")
    print(f"training {args.positions} positions x {args.train_tokens:.3g} tokens at {gpu_tps:.0f} tokens/s: "
          f"{args.positions * args.train_tokens / gpu_tps / 3600:.2f} GPU-hours")
    print(f"SAE training at width {WIDTH}, {latents} latents, k {k}: {measured:.0f} tokens/s on {args.device} "
          f"({torch.get_num_threads()} threads) - measured")
    print(f"GPU training speed used below: {gpu_tps:.0f} tokens/s ({result['gpu_tokens_per_s_is']})")
    print(f"collection: {args.sample_seconds} s per prompt per GPU (input); training: {args.train_tokens:.3g} tokens "
          f"per position")
    print("prompts  GPUs  store GB  GPU-hours  wall hours")
    for r in rows:
        print(f"{r['prompts']:>7} {r['gpus']:>5} {r['store_GB']:>9.1f} {r['gpu_hours']:>10.1f} {r['wall_hours']:>11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
