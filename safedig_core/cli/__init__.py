"""`safedig` command line: one subcommand per module of this package, each a thin shell over the core that
registers itself with `add_cli(sub)`.

Errors a user can fix (bad files, bad arguments) print one line naming the problem and exit 2; nothing prints a
traceback for them. This package may import every other part of `safedig_core`; nothing imports it.
"""
from __future__ import annotations

import argparse
import sys

from . import adapt, build, collect, convert, demo, evaluate, inspect, plot, route, train
from .common import UserError

COMMANDS = (inspect, demo, route, collect, convert, evaluate, plot, train, adapt, build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safedig", description="SafeDIG safety steering for text-to-image DiTs")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_cli(sub)
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
