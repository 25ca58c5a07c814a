"""`safedig build`: route, train and adapt; one activation store to one dictionary file."""
from __future__ import annotations

from ..formats import dictionary
from ..pipeline import distributed
from ..pipeline.adapt import AdaptConfig
from ..pipeline.build import BuildConfig, build
from ..pipeline.train import TrainConfig
from .common import StopFlag, open_store


def run(args) -> None:
    cfg = BuildConfig(top_k=args.top, positions=[n.strip() for n in args.positions.split(",")] if args.positions else None,
                      train=TrainConfig(expansion=args.expansion, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                        seed=args.seed),
                      adapt=None if args.no_adapt else AdaptConfig(steps=args.adapt_steps, batch_size=args.batch_size,
                                                                   seed=args.seed))
    ranks = distributed.from_env(args.device)
    with StopFlag() as stop:
        summary = build(open_store(args.store), args.out, cfg, args.work, device=args.device, should_stop=stop,
                        ranks=ranks)
    if not ranks.main:
        return
    print(dictionary.summary(dictionary.load(args.out), args.out))
    print(f"routed positions: {', '.join(summary['positions'])}")


def add_cli(sub) -> None:
    p = sub.add_parser("build", help="route, train and adapt: one activation store to one safety dictionary file")
    p.add_argument("store", metavar="STORE", help="activation store folder (from `safedig collect`)")
    p.add_argument("--out", required=True, metavar="FILE", help="the dictionary file to write (.safetensors)")
    p.add_argument("--work", default=None, metavar="DIR", help="work folder for checkpoints and reports "
                                                               "(default: next to --out); a rerun resumes from it")
    p.add_argument("--top", type=int, default=3, metavar="K", help="positions to route to (default 3)")
    p.add_argument("--positions", default=None, help="skip routing: use these comma-separated positions")
    p.add_argument("--expansion", type=int, default=16, help="latents per activation dimension (default 16)")
    p.add_argument("-k", type=int, default=32, help="TopK (default 32)")
    p.add_argument("--steps", type=int, default=10_000, help="SAE training steps per position")
    p.add_argument("--adapt-steps", type=int, default=1000, help="decoder adaptation steps per position")
    p.add_argument("--no-adapt", action="store_true", help="keep the source decoders (no target adaptation)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(run=run)
