"""`safedig train`: one TopK SAE per position of a store, harmful latents scored."""
from __future__ import annotations

import os

from ..pipeline import distributed
from ..pipeline.harmful import HarmfulConfig
from ..pipeline.train import TrainConfig, train_store
from ..positions import parse_list
from .common import StopFlag, open_store


def add_cli(sub) -> None:
    parser = sub.add_parser("train", help="train one TopK SAE per position of an activation store, score harmful latents")
    parser.set_defaults(run=run)
    parser.add_argument("store", help="activation store folder written by `safedig collect`")
    parser.add_argument("--out", default="out/train", help="folder for checkpoints, logs and the dictionary")
    parser.add_argument("--dictionary", default=None, help="dictionary file to write (default OUT/dictionary.safetensors)")
    parser.add_argument("--positions", default="all", help="comma list of positions, or 'all' (the store's)")
    parser.add_argument("--latents", type=int, default=None, help="latents per SAE (default expansion × width)")
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(latents / 2^14)")
    parser.add_argument("--dead-tokens", type=int, default=None,
                        help="a latent not firing for this many tokens is dead (AuxK); default "
                             "min(10M, half the position's rows in the store)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start again")
    parser.add_argument("--harmful-threshold", type=float, default=0.25)
    parser.add_argument("--max-harmful", type=int, default=64)
    parser.add_argument("--eval-batches", type=int, default=32)


def run(args) -> None:
    store = open_store(args.store)
    positions = parse_list(args.positions, list(store.positions))
    cfg = TrainConfig(latents=args.latents, expansion=args.expansion, k=args.k, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr,
                      dead_tokens=args.dead_tokens or TrainConfig.dead_tokens,
                      checkpoint_every=args.checkpoint_every, seed=args.seed)
    hcfg = HarmfulConfig(threshold=args.harmful_threshold, max_latents=args.max_harmful)
    ranks = distributed.from_env(args.device)
    with StopFlag() as stop:
        report = train_store(store, args.out, positions, cfg, hcfg, dictionary_path=args.dictionary,
                             resume=not args.fresh, device=args.device, eval_batches=args.eval_batches,
                             should_stop=stop, ranks=ranks, auto_dead_tokens=args.dead_tokens is None,
                             provenance={"made_by": "safedig train", "store": os.path.abspath(args.store)})
    if not ranks.main:
        return
    for name, m in report.items():
        print(f"{name}: FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_frac']:.3f}, {m['harmful']} harmful latents")
    print(f"wrote {args.dictionary or os.path.join(args.out, 'dictionary.safetensors')}")
