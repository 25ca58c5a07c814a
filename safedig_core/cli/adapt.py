"""`safedig adapt`: refit a dictionary's decoders on a store's target domain, encoder frozen."""
from __future__ import annotations

from ..formats.dictionary import read_metadata
from ..pipeline import distributed
from ..pipeline.adapt import RESCORE_MODES, AdaptConfig, adapt_store
from ..positions import parse, parse_list
from . import args as A
from .common import StopFlag, open_store


def add_cli(sub) -> None:
    parser = sub.add_parser("adapt", help="refit a dictionary's decoders on the store's target domain (encoder frozen)")
    parser.set_defaults(run=run)
    parser.add_argument("dictionary", help="source dictionary file (from `safedig train`)")
    parser.add_argument("store", help="activation store folder with target-domain (and source-domain) prompts")
    parser.add_argument("--out", required=True, type=A.output_file, help="adapted dictionary file to write")
    parser.add_argument("--positions", default="all", help="comma list of positions, or 'all' (the dictionary's)")
    parser.add_argument("--steps", type=A.STEPS, default=1000)
    parser.add_argument("--batch-size", type=A.BATCH, default=4096)
    parser.add_argument("--lr", type=A.LR, default=1e-3)
    parser.add_argument("--anchor", type=A.number(0.0, 1e6), default=1e-3, help="λ, weight of ‖W_dec − W_dec_src‖²")
    parser.add_argument("--replay", type=A.number(0.0, 1e4), default=1.0, help="μ, weight of the source-replay FVU (0: none)")
    parser.add_argument("--retention", type=A.number(0.0, 100.0), default=0.05,
                        help="relative source-FVU increase allowed; μ is raised to hold it (0: fixed μ)")
    parser.add_argument("--fixed-bias", action="store_true", help="keep b_dec (and so the encoder function) fixed")
    parser.add_argument("--rescore", choices=("none",) + RESCORE_MODES, default="none",
                        help="re-score harmful latents on the target domain through the frozen encoder")
    parser.add_argument("--eval-batches", type=A.integer(0, 1 << 20), default=32,
                        help="batches per domain for the before/after FVU (0: all)")
    parser.add_argument("--seed", type=A.SEED, default=0)
    parser.add_argument("--device", type=A.device, default=None, help="cpu, cuda, cuda:N or mps (default cpu)")


def run(args) -> None:
    store = open_store(args.store)
    meta = read_metadata(args.dictionary)
    positions = parse_list(args.positions, [parse(n) for n in meta["positions"]])
    cfg = AdaptConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, anchor=args.anchor,
                      replay=args.replay, retention=(args.retention or None) if args.replay else None,
                      train_bias=not args.fixed_bias, seed=args.seed, eval_batches=args.eval_batches or None)
    ranks = distributed.from_env(args.device)
    with StopFlag() as stop:
        report = adapt_store(args.dictionary, store, args.out, positions, cfg,
                             rescore=None if args.rescore == "none" else args.rescore, device=args.device,
                             should_stop=stop, ranks=ranks)
    if not ranks.main:
        return
    for name, m in report.items():
        line = f"{name}: target FVU {m['target_fvu_before']:.4f} -> {m['target_fvu_after']:.4f}"
        if "source_fvu_before" in m:
            line += f", source FVU {m['source_fvu_before']:.4f} -> {m['source_fvu_after']:.4f}"
        if "harmful_drift_max" in m:
            line += f", harmful drift (1-cos) mean {m['harmful_drift_mean']:.4f} max {m['harmful_drift_max']:.4f}"
        print(line)
    print(f"wrote {args.out}")
