"""`safedig attack`: the discrete and soft attacks against the models a `safedig demo` built (per seed, at the
operating points the demo chose); writes attack.json, attack.md and attack.png."""
from __future__ import annotations

import os

from ..testbed import kernels
from ..testbed.seeds import DEFAULT_SEED
from . import args as A
from .common import UserError


def run_attack(args) -> None:
    kernels.choose(args.native_kernels)  # before the first tensor operation
    from ..testbed.attack import run

    if not os.path.isfile(os.path.join(args.demo, "report.json")):
        if not args.quick:
            raise UserError(f"{args.demo}: no demo report there; run `safedig demo --out {args.demo}` first "
                            f"(or pass --quick to run the quick demo there now)")
        from ..testbed import demo

        demo.run(args.demo, args.seed, quick=True, threads=args.threads)
    run.run(args.demo, args.out, quick=args.quick, seeds=args.seeds, threads=args.threads, budget=args.budget)


def add_cli(sub) -> None:
    p = sub.add_parser("attack", help="attack the testbed models a `safedig demo` built (discrete prompt search "
                                       "with a query budget, white-box soft attack on the text states); writes "
                                       "attack.json, attack.md, attack.png")
    p.add_argument("--demo", default="out/demo", type=A.output_dir,
                   help="the demo's output folder (default out/demo); with --quick and no report there, the quick "
                        "demo runs there first")
    p.add_argument("--out", default=None, type=A.output_dir, help="folder for the attack's outputs (default: --demo)")
    kernels.add_flag(p)
    p.add_argument("--seeds", type=A.integer(0, 2 ** 31 - 1), nargs="+", default=None,
                   help="which of the demo's seeds to attack (default: all)")
    p.add_argument("--seed", type=A.integer(0, 2 ** 31 - 1), default=DEFAULT_SEED,
                   help=f"first seed of the quick demo run when --demo has none (default {DEFAULT_SEED}, as safedig "
                        "demo's)")
    p.add_argument("--budget", type=A.integer(1, 100000), default=None,
                   help="images the discrete attack may ask for per start (default 48, 24 with --quick)")
    p.add_argument("--threads", type=A.integer(1, 256), default=None, help="torch threads")
    p.add_argument("--quick", action="store_true", help="fewer starts, budget and seeds (CI)")
    p.set_defaults(run=run_attack)
