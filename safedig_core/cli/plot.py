"""`safedig plot features|routing|grid`: the pictures people would rather look at than read."""
from __future__ import annotations

from ..evaluation.plots import plot_features, plot_grid, plot_routing
from . import args as A


def add_cli(sub) -> None:
    """Register `safedig plot features|routing|grid` on the CLI's subparsers."""
    p = sub.add_parser("plot", help="PNG pictures: a dictionary's harmful latents, a routing report, "
                                    "before/after grids")
    kinds = p.add_subparsers(dest="plot", required=True)
    k = kinds.add_parser("features", help="per position: the harmful latents' scores, sorted, top indices labelled")
    k.add_argument("dictionary", metavar="DICT", help="a safety dictionary (.safetensors)")
    k.add_argument("--out", default="features.png", type=A.output_file, help="PNG to write (default features.png)")
    k.set_defaults(run=lambda a: print(f"wrote {plot_features(a.dictionary, a.out)}"))
    k = kinds.add_parser("routing", help="the routing scores per position, from routing.json")
    k.add_argument("report", metavar="ROUTING_JSON")
    k.add_argument("--out", default="routing.png", type=A.output_file, help="PNG to write (default routing.png)")
    k.set_defaults(run=lambda a: print(f"wrote {plot_routing(a.report, a.out)}"))
    k = kinds.add_parser("grid", help="before/after pairs of images matched by file name")
    k.add_argument("before", metavar="BEFORE_DIR")
    k.add_argument("after", metavar="AFTER_DIR")
    k.add_argument("--out", default="grid.png", type=A.output_file, help="PNG to write (default grid.png)")
    k.add_argument("--labels", nargs="+", metavar="CSV", help="`safedig eval` CSVs: unsafe images get a red frame")
    k.add_argument("--cols", type=A.integer(1, 256), default=4, help="pairs per row (default 4)")
    k.add_argument("--size", type=A.integer(8, 4096), default=128, help="cell size in pixels (default 128)")
    k.set_defaults(run=_grid_cli)


def _grid_cli(args) -> None:
    if args.cols < 1 or args.size < 8:
        raise ValueError(f"--cols {args.cols} must be ≥ 1 and --size {args.size} ≥ 8")
    path, unpaired = plot_grid(args.before, args.after, args.out, args.labels, args.cols, args.size)
    if unpaired:
        print(f"skipped {len(unpaired)} image(s) found in only one folder: {', '.join(unpaired[:5])}"
              + (" ..." if len(unpaired) > 5 else ""))
    print(f"wrote {path}")
