"""`safedig demo` (the whole pipeline on the built-in testbed) and `safedig tiny-demo` (steering a tiny
random-weight FLUX in the real ComfyUI)."""
from __future__ import annotations

import argparse

from ..testbed import kernels
from ..testbed.seeds import DEFAULT_SEED
from . import args as A


def run_demo(args) -> None:
    kernels.choose(args.native_kernels)  # before the first tensor operation
    from ..testbed import demo

    demo.run(args.out, args.seed, args.quick, seeds=args.seeds, threads=args.threads, pair_scenes=args.pair_scenes,
             pooled=args.pooled, rescore=args.rescore)


def run_tiny_demo(args) -> None:
    from ..testbed import tiny_demo

    tiny_demo.run(args.out, args.seed)


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in testbed DiT: collect, route, train, adapt, "
                                     "steer, evaluate over several seeds; prints the table and writes report.json, curves.png, grid.png, "
                                     "routing.png, features.png, feature_map.png")
    p.add_argument("--out", default="out/demo", type=A.output_dir, help="output folder (default out/demo)")
    p.add_argument("--seed", type=A.integer(0, 2 ** 31 - 1), default=DEFAULT_SEED,
                   help=f"the first seed; every random choice of a seed follows it (default {DEFAULT_SEED}: seeds 0-4 "
                        f"are the development seeds, 5-{DEFAULT_SEED - 1} judged earlier defaults, so the default "
                        "measures seeds the current method was not developed on)")
    p.add_argument("--seeds", type=A.integer(1, 100), default=None,
                   help="how many seeds (seed, seed+1, ...); default 3, 1 with --quick")
    p.add_argument("--threads", type=A.integer(1, 256), default=None,
                   help="torch threads for generation (SAE training always uses 1)")
    p.add_argument("--quick", action="store_true", help="smaller prompt sets and shorter training (CI)")
    kernels.add_flag(p)
    p.add_argument("--pair-scenes", action="store_true",
                   help="also build the dictionary from two-object scenes and steer with focus 0.5 (measured, not "
                        "the default: docs/METHOD_NOTES.md)")
    p.add_argument("--pooled", action=argparse.BooleanOptionalAction, default=True,
                   help="also steer the pooled text vector (input.pooled): a flagged prompt's becomes the nearest "
                        "safe building prompt's, and SafeDIG steers at the text positions and there only (default; "
                        "--no-pooled: every routed position steers, the default before held-out seeds 11-13: "
                        "docs/METHOD_NOTES.md)")
    p.add_argument("--rescore", choices=("guarded", "union", "rescore"), default=None,
                   help="how adaptation re-scores the harmful latents (BuildConfig.rescore, default guarded: the "
                        "union of the source and target selections that keeps the gate's separation on the "
                        "building prompts; union: the default before held-out seeds 11-13: docs/METHOD_NOTES.md)")
    p.set_defaults(run=run_demo)
    p = sub.add_parser("tiny-demo", help="steer a tiny random-weight FLUX in the real ComfyUI and print what changed")
    p.add_argument("--out", default="out/tiny-demo", type=A.output_dir, help="folder for the dictionary it writes")
    p.add_argument("--seed", type=A.integer(0, 2 ** 31 - 1), default=0)
    p.set_defaults(run=run_tiny_demo)
