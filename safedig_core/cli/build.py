"""`safedig build`: route, train and adapt; one activation store to one dictionary file."""
from __future__ import annotations

import os

from ..formats import dictionary
from ..pipeline import distributed
from ..pipeline.adapt import RESCORE_MODES, AdaptConfig
from ..pipeline.build import BuildConfig, build
from ..pipeline.train import TrainConfig
from . import args as A
from .common import StopFlag, UserError, check_sae_size, open_store


def run(args) -> None:
    if os.path.exists(args.out) and not args.overwrite:  # before the store is even opened
        raise UserError(f"{args.out} already exists; pass --overwrite to replace it")
    cfg = BuildConfig(top_k=args.top, positions=[n.strip() for n in args.positions.split(",")] if args.positions else None,
                      train=TrainConfig(expansion=args.expansion, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                        seed=args.seed),
                      adapt=None if args.no_adapt else AdaptConfig(steps=args.adapt_steps, batch_size=args.batch_size,
                                                                   seed=args.seed),
                      rescore=None if args.rescore == "none" else args.rescore)
    store = open_store(args.store)
    check_sae_size(store, cfg.positions, args.expansion, None, args.k)
    ranks = distributed.from_env(args.device)
    with StopFlag() as stop:
        summary = build(store, args.out, cfg, args.work, device=args.device, should_stop=stop,
                        overwrite=args.overwrite, ranks=ranks)
    if not ranks.main:
        return
    print(dictionary.summary(dictionary.load(args.out), args.out))
    print(f"routed positions: {', '.join(summary['positions'])}")


def add_cli(sub) -> None:
    p = sub.add_parser("build", help="route, train and adapt: one activation store to one safety dictionary file")
    p.add_argument("store", metavar="STORE", help="activation store folder (from `safedig collect`)")
    p.add_argument("--out", required=True, metavar="FILE", type=A.output_file,
                   help="the dictionary file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--work", default=None, metavar="DIR", type=A.output_dir, help="work folder for checkpoints and reports "
                                                               "(default: next to --out); a rerun resumes from it")
    p.add_argument("--top", type=A.integer(1, 64), default=3, metavar="K", help="positions to route to (default 3)")
    p.add_argument("--positions", default=None, help="skip routing: use these comma-separated positions")
    p.add_argument("--expansion", type=A.EXPANSION, default=16, help="latents per activation dimension (default 16)")
    p.add_argument("-k", type=A.integer(1, 4096), default=32, help="TopK (default 32)")
    p.add_argument("--steps", type=A.STEPS, default=10_000, help="SAE training steps per position")
    p.add_argument("--adapt-steps", type=A.integer(0, 10 ** 8), default=1000, help="decoder adaptation steps per position")
    p.add_argument("--no-adapt", action="store_true", help="keep the source decoders (no target adaptation)")
    p.add_argument("--rescore", choices=RESCORE_MODES + ("none",), default=BuildConfig.rescore,
                   help=f"how adaptation re-scores the harmful latents on the target set (default "
                        f"{BuildConfig.rescore}: the union of the source and target selections that keeps the "
                        "per-image gate's separation on the building prompts; none: keep the source scores)")
    p.add_argument("--batch-size", type=A.BATCH, default=4096)
    p.add_argument("--seed", type=A.SEED, default=0)
    p.add_argument("--device", type=A.device, default=None, help="cpu, cuda, cuda:N or mps (default cpu)")
    p.set_defaults(run=run)
