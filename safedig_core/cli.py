"""`safedig` command line: one subcommand per job, each a thin shell over the core.

Errors a user can fix (bad files, bad arguments) print one line naming the problem and exit 2;
nothing prints a traceback for them.
"""
from __future__ import annotations

import argparse
import sys

from . import dictionary


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _inspect(args) -> None:
    for path in args.files:
        print(dictionary.summary(dictionary.load(path), path))


def _demo(args) -> None:
    from .testbed import demo

    demo.run(args.out, args.seed, args.quick)


def _tiny_demo(args) -> None:
    from . import tiny_demo

    tiny_demo.run(args.out, args.seed)


def _route(args) -> None:
    from . import routing
    from .store import ActivationStore

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    if weights is not None and len(weights) != 3:
        raise UserError(f"--weights takes three numbers T,S,A (got {args.weights!r})")
    cfg = routing.RoutingConfig(min_gap=args.min_gap, probe=args.probe, transfer_stat=args.transfer_stat,
                                fallback=args.fallback, seed=args.seed)
    if weights is not None:
        cfg.w_transfer, cfg.w_stability, cfg.w_separability = weights
    positions = [n for n in args.positions.split(",") if n.strip()] if args.positions else None
    report = routing.route(ActivationStore(args.store), args.top, cfg, positions=positions,
                           progress=lambda i, n, p: print(f"[{i + 1}/{n}] scoring {p}", file=sys.stderr))
    js, png = report.save(args.out)
    print(report.summary())
    print(f"wrote {js} and {png}")


def _build(args) -> None:
    from .adapt import AdaptConfig
    from .build import BuildConfig, build
    from .train import StopFlag, TrainConfig, open_store

    cfg = BuildConfig(top_k=args.top, positions=[n.strip() for n in args.positions.split(",")] if args.positions else None,
                      train=TrainConfig(expansion=args.expansion, k=args.k, steps=args.steps, batch_size=args.batch_size,
                                        seed=args.seed),
                      adapt=None if args.no_adapt else AdaptConfig(steps=args.adapt_steps, batch_size=args.batch_size,
                                                                   seed=args.seed))
    with StopFlag() as stop:
        summary = build(open_store(args.store), args.out, cfg, args.work, device=args.device, should_stop=stop)
    print(dictionary.summary(dictionary.load(args.out), args.out))
    print(f"routed positions: {', '.join(summary['positions'])}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedig", description="SafeDIG safety steering for text-to-image DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a readable summary of safety dictionary files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("demo", help="the whole pipeline on the built-in testbed DiT: collect, route, train, adapt, "
                                     "steer, evaluate; prints the table and writes report.json, grid.png, routing.png, features.png, feature_map.png")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0, help="every random choice follows it")
    p.add_argument("--quick", action="store_true", help="smaller prompt sets and shorter training (CI)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("tiny-demo", help="steer a tiny random-weight FLUX in the real ComfyUI and print what changed")
    p.add_argument("--out", default="out/tiny-demo", help="folder for the dictionary it writes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny_demo)
    p = sub.add_parser("route", help="score a collected store's positions (source prompts only) and pick the top K "
                                     "for SAE training; writes routing.json and routing.png")
    p.add_argument("store", metavar="STORE", help="activation store folder (from `safedig collect`)")
    p.add_argument("--top", type=int, default=4, metavar="K", help="number of positions to select (default 4)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for routing.json and routing.png")
    p.add_argument("--positions", default=None, help="comma list of positions to score (default: all in the store)")
    p.add_argument("--weights", default=None, metavar="T,S,A", help="score weights (default 0.5,0.25,0.25)")
    p.add_argument("--min-gap", type=int, default=2, help="selected positions of one stream are more than this "
                                                          "many blocks apart (default 2)")
    p.add_argument("--probe", choices=("diffmean", "ridge"), default="diffmean")
    p.add_argument("--transfer-stat", choices=("mean", "min"), default="mean",
                   help="LOCO statistic used in the score (default mean; min = worst held-out category)")
    p.add_argument("--fallback", choices=("split", "raise"), default="split",
                   help="with fewer than 2 source categories: split prompts within the category, or refuse")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_route)
    from . import collect  # `safedig collect`: its arguments live beside the code they drive

    collect.add_cli(sub)
    from . import convert  # `safedig convert`: another library's SAE to a dictionary file

    convert.add_cli(sub)
    from . import evaluate, plots  # `safedig eval` / `safedig plot`

    evaluate.add_cli(sub)
    plots.add_cli(sub)
    from . import adapt, train  # `safedig train` / `safedig adapt`: arguments live beside their code

    p = sub.add_parser("train", help="train one TopK SAE per position of an activation store, score harmful latents")
    train.add_cli_arguments(p)
    p.set_defaults(run=train.cli_main)
    p = sub.add_parser("adapt", help="refit a dictionary's decoders on the store's target domain (encoder frozen)")
    adapt.add_cli_arguments(p)
    p.set_defaults(run=adapt.cli_main)
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
    p.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"safedig {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safedig {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
