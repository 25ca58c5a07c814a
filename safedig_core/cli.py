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


def _tiny_demo(args) -> None:
    from . import tiny_demo

    tiny_demo.run(args.out, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedig", description="SafeDIG safety steering for text-to-image DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a readable summary of safety dictionary files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("tiny-demo", help="steer a tiny random-weight FLUX in the real ComfyUI and print what changed")
    p.add_argument("--out", default="out/tiny-demo", help="folder for the dictionary it writes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_tiny_demo)
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
