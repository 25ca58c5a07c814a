"""`safedig` command line: one subcommand per module of this package, each a thin shell over the core that
registers itself with `add_cli(sub)`.

Errors a user can fix (bad files, bad arguments) print one line naming the problem and exit 2; nothing prints a
traceback for them. This package may import every other part of `safedig_core`; nothing imports it.
"""
from __future__ import annotations

import argparse
import sys

from ..formats.messages import shorten
from . import adapt, attack, build, collect, convert, demo, evaluate, inspect, plot, route, train
from .args import MESSAGE_LIMIT, Parser
from .common import UserError

COMMANDS = (inspect, demo, attack, route, collect, convert, evaluate, plot, train, adapt, build)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="safedig", description="SafeDIG safety steering for text-to-image DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (its line already printed) or --help
        return e.code if isinstance(e.code, int) else 0
    try:
        args.run(args)
    except (UserError, ValueError, OSError) as e:
        print(f"safedig {args.command}: error: {shorten(str(e) or type(e).__name__, MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safedig {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
