"""Is the memory of training bounded by the shard, not by the store?

Writes a synthetic activation store of ≥ 10 M token rows (one position, width 32, float16: about 0.8 GB with
the per-row indices) into a temporary folder with `StoreWriter`, then trains a TopK SAE on it with
`pipeline.train.train_sae` through the streamed reader (`ActivationStore.iter_batches`) for a few steps, then
streams one whole shuffled epoch through the same reader (every shard read and checked once, as a training
epoch reads them), in a fresh process, and reports that process's peak resident memory
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) after training and after the epoch, next to the same process's
peak when it stops right after opening the store (imports, torch, the manifest: the baseline), the shard size
and the store size. It does
this for two shard sizes, so that the peak is seen to follow the shard and not the store. Each store is
deleted after its run.

    python benchmarks/store_memory.py             # ~10.5 M tokens, two shard sizes: a few minutes on 2 cores
    python benchmarks/store_memory.py --quick     # 200 k tokens: seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

POSITION = "double.0.img"


def write_store(path: str, tokens: int, width: int, per_prompt: int, prompts_per_shard: int) -> dict:
    import torch

    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.formats.store import StoreWriter

    n_prompts = -(-tokens // per_prompt)
    recs = [PromptRecord(f"p{i}", f"prompt {i}", "safe", "", "source") for i in range(n_prompts)]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    with StoreWriter(path, "flux", [POSITION], {POSITION: width}, recs, {"steps": 1, "synthetic": True},
                     prompts_per_shard=prompts_per_shard) as w:
        for i in range(n_prompts):
            x = torch.randn(per_prompt, width, generator=g)
            rows = {POSITION: (x, torch.zeros(per_prompt, dtype=torch.int32), torch.arange(per_prompt, dtype=torch.int32))}
            w.add(i, rows, {POSITION: (x.mean(0, keepdim=True), torch.zeros(1, dtype=torch.int32))})
    files = [os.path.join(path, f) for f in os.listdir(path)]
    shards = [f for f in files if os.path.basename(f).startswith("shard-")]
    return {"tokens": n_prompts * per_prompt, "prompts": n_prompts, "shards": len(shards),
            "store_bytes": sum(os.path.getsize(f) for f in files),
            "shard_bytes": max(os.path.getsize(f) for f in shards), "write_s": time.perf_counter() - t0}


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def train_child(path: str, steps: int, batch: int) -> None:
    """The measured process: open the store, train `steps` steps and stream one epoch (0: stop after opening),
    print JSON."""
    from safedig_core.formats.store import ActivationStore
    from safedig_core.pipeline.train import TrainConfig, train_sae

    store = ActivationStore(path)
    out = {"steps": steps}
    if steps:
        t0 = time.perf_counter()
        cfg = TrainConfig(expansion=8, k=4, steps=steps, batch_size=batch, checkpoint_every=10**9, log_every=10**9)
        train_sae(store, cfg, position=POSITION)
        out["train_s"], out["train_rss_bytes"] = time.perf_counter() - t0, peak_rss()
        t0, rows = time.perf_counter(), 0
        for b in store.iter_batches(POSITION, batch, shuffle=True, seed=1):
            rows += len(b.x)
        out["epoch_s"], out["epoch_rows"] = time.perf_counter() - t0, rows
    out["peak_rss_bytes"] = peak_rss()
    print(json.dumps(out))


def measure(path: str, steps: int, batch: int) -> dict:
    run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, "--steps", str(steps),
                          "--batch", str(batch)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=10_500_000)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--per-prompt", type=int, default=5000, help="token rows per prompt")
    ap.add_argument("--shard-prompts", default="20,100", help="prompts per shard, one store each")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", metavar="STORE", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        train_child(a.child, a.steps, a.batch)
        return 0
    if a.quick:
        a.tokens, a.per_prompt, a.shard_prompts, a.batch = 200_000, 1000, "10,50", 1024
    rows = []
    print(f"training memory vs shard size: synthetic store of {a.tokens / 1e6:.1f} M token rows, width {a.width}, "
          f"float16, one position; TopK SAE 8x, k 4, batch {a.batch}, {a.train_steps} training steps, then one "
          "shuffled epoch streamed (every shard read once); peak RSS of a fresh process (ru_maxrss)")
    print(f"{'shard prompts':>13}{'shards':>8}{'shard MB':>10}{'store MB':>10}{'baseline MB':>13}{'training MB':>13}"
          f"{'+ epoch MB':>12}{'epoch extra':>13}{'per shard':>11}")
    for spp in (int(s) for s in a.shard_prompts.split(",")):
        tmp = tempfile.mkdtemp(prefix="safedig-store-memory-")
        try:
            info = write_store(os.path.join(tmp, "store"), a.tokens, a.width, a.per_prompt, spp)
            steps = a.train_steps
            base = measure(os.path.join(tmp, "store"), 0, a.batch)
            trained = measure(os.path.join(tmp, "store"), steps, a.batch)
            assert trained["epoch_rows"] == info["tokens"], (trained, info)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        extra = trained["peak_rss_bytes"] - trained["train_rss_bytes"]
        row = {"prompts_per_shard": spp, **info, "steps": steps, "baseline_rss_bytes": base["peak_rss_bytes"],
               "training_rss_bytes": trained["train_rss_bytes"], "epoch_rss_bytes": trained["peak_rss_bytes"],
               "epoch_extra_bytes": extra, "train_s": trained["train_s"], "epoch_s": trained["epoch_s"]}
        rows.append(row)
        mb = 1e6
        print(f"{spp:>13}{info['shards']:>8}{info['shard_bytes'] / mb:>10.1f}{info['store_bytes'] / mb:>10.0f}"
              f"{base['peak_rss_bytes'] / mb:>13.0f}{trained['train_rss_bytes'] / mb:>13.0f}"
              f"{trained['peak_rss_bytes'] / mb:>12.0f}{extra / mb:>13.0f}{extra / info['shard_bytes']:>10.1f}x")
    print("training MB: peak after the training steps; + epoch MB: peak after streaming the whole store as well; "
          "epoch extra: what the epoch added to the peak, also as a multiple of one shard's size")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "runs": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
