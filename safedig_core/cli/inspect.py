"""`safedig inspect`: a readable summary of safety dictionary files."""
from __future__ import annotations

from ..formats import dictionary


def run(args) -> None:
    for path in args.files:
        print(dictionary.summary(dictionary.load(path), path))


def add_cli(sub) -> None:
    p = sub.add_parser("inspect", help="print a readable summary of safety dictionary files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=run)
