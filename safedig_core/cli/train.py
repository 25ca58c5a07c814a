"""`safedig train`: one TopK SAE per position of a store, harmful latents scored."""
from __future__ import annotations

import os

from ..pipeline import distributed
from ..pipeline.build import store_fingerprint
from ..pipeline.harmful import HarmfulConfig
from ..pipeline.train import TrainConfig, train_store
from ..positions import parse_list
from . import args as A
from .common import StopFlag, check_sae_size, open_store


def add_cli(sub) -> None:
    parser = sub.add_parser("train", help="train one TopK SAE per position of an activation store, score harmful latents")
    parser.set_defaults(run=run)
    parser.add_argument("store", help="activation store folder written by `safedig collect`")
    parser.add_argument("--out", default="out/train", type=A.output_dir, help="folder for checkpoints, logs and the dictionary")
    parser.add_argument("--dictionary", default=None, type=A.output_file, help="dictionary file to write (default OUT/dictionary.safetensors)")
    parser.add_argument("--positions", default="all", help="comma list of positions, or 'all' (the store's)")
    parser.add_argument("--latents", type=A.integer(1, 1 << 22), default=None, help="latents per SAE (default expansion × width)")
    parser.add_argument("--expansion", type=A.EXPANSION, default=16)
    parser.add_argument("--k", type=A.integer(1, 4096), default=32)
    parser.add_argument("--steps", type=A.STEPS, default=10_000)
    parser.add_argument("--batch-size", type=A.BATCH, default=4096)
    parser.add_argument("--lr", type=A.LR, default=None, help="default 2e-4 / sqrt(latents / 2^14)")
    parser.add_argument("--dead-tokens", type=A.integer(1), default=None,
                        help="a latent not firing for this many tokens is dead (AuxK); default "
                             "min(10M, half the position's rows in the store)")
    parser.add_argument("--checkpoint-every", type=A.integer(1), default=500)
    parser.add_argument("--seed", type=A.SEED, default=0)
    parser.add_argument("--device", type=A.device, default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start again")
    parser.add_argument("--harmful-threshold", type=A.number(0.0), default=0.25)
    parser.add_argument("--max-harmful", type=A.integer(0, 1 << 22), default=64)
    parser.add_argument("--eval-batches", type=A.integer(0, 1 << 20), default=32)


def run(args) -> None:
    store = open_store(args.store)
    positions = parse_list(args.positions, list(store.positions))
    check_sae_size(store, positions, args.expansion, args.latents, args.k,
                   "--latents" if args.latents else "--expansion")
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
                             provenance={"made_by": "safedig train",
                                         "store": os.path.basename(os.path.normpath(args.store)),
                                         "store_sha256": store_fingerprint(store)})
    if not ranks.main:
        return
    for name, m in report.items():
        print(f"{name}: FVU {m['fvu']:.4f}, L0 {m['l0']:.1f}, dead {m['dead_frac']:.3f}, {m['harmful']} harmful latents")
    print(f"wrote {args.dictionary or os.path.join(args.out, 'dictionary.safetensors')}")
