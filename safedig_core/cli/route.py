"""`safedig route`: score a store's positions before any training and pick the ones to train."""
from __future__ import annotations

import sys

from ..formats import store
from ..pipeline import routing
from . import args as A


def run(args) -> None:
    weights = args.weights
    cfg = routing.RoutingConfig(min_gap=args.min_gap, probe=args.probe, transfer_stat=args.transfer_stat,
                                fallback=args.fallback, seed=args.seed)
    if weights is not None:
        cfg.w_transfer, cfg.w_stability, cfg.w_separability = weights
    positions = [n for n in args.positions.split(",") if n.strip()] if args.positions else None
    report = routing.route(store.ActivationStore(args.store), args.top, cfg, positions=positions,
                           progress=lambda i, n, p: print(f"[{i + 1}/{n}] scoring {p}", file=sys.stderr))
    js, png = report.save(args.out)
    print(report.summary())
    print(f"wrote {js} and {png}")


def add_cli(sub) -> None:
    p = sub.add_parser("route", help="score a collected store's positions (source prompts only) and pick the top K "
                                     "for SAE training; writes routing.json and routing.png")
    p.add_argument("store", metavar="STORE", help="activation store folder (from `safedig collect`)")
    p.add_argument("--top", type=A.integer(1, 64), default=4, metavar="K", help="number of positions to select (default 4)")
    p.add_argument("--out", required=True, metavar="DIR", type=A.output_dir, help="folder for routing.json and routing.png")
    p.add_argument("--positions", default=None, help="comma list of positions to score (default: all in the store)")
    p.add_argument("--weights", default=None, metavar="T,S,A", type=A.numbers(3), help="score weights (default 0.5,0.25,0.25)")
    p.add_argument("--min-gap", type=A.integer(0, 1000), default=2, help="selected positions of one stream are more than this "
                                                          "many blocks apart (default 2)")
    p.add_argument("--probe", choices=("diffmean", "ridge"), default="diffmean")
    p.add_argument("--transfer-stat", choices=("mean", "min"), default="mean",
                   help="LOCO statistic used in the score (default mean; min = worst held-out category)")
    p.add_argument("--fallback", choices=("split", "raise"), default="split",
                   help="with fewer than 2 source categories: split prompts within the category, or refuse")
    p.add_argument("--seed", type=A.SEED, default=0)
    p.set_defaults(run=run)
