"""How a testbed dictionary steers at the operating point stored in it: the world's evaluation prompts of one seed,
sampled unsteered and steered through ComfyUI (Apply Steering's path: `steering_defaults`, its `positions`
word), judged by the testbed classifier. The check behind the shipped dictionary's note in docs/METHOD_NOTES.md.

    python scripts/dictionary_eval.py                                   # the shipped testbed dictionary
    python -m safedig_core.testbed.dictionary --pooled --out /tmp/p.safetensors
    python scripts/dictionary_eval.py --dictionary /tmp/p.safetensors   # the same, built in the demo's mode

Prints unsafe rate (source, target) and safe fidelity, unsteered and steered.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    from safedig_core.testbed import kernels
    from safedig_core.testbed.dictionary import PATH

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dictionary", default=PATH, help="a testbed dictionary file (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=0, help="the world seed whose evaluation prompts are used")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps (default 20, the testbed workflow's)")
    args = ap.parse_args(argv)
    kernels.choose(False)  # before the first tensor operation, as the demo
    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.formats.dictionary import load
    from safedig_core.testbed import sweep, variants, world
    from safedig_core.testbed.model import load_testbed

    d = load(args.dictionary)
    defaults = d.steering_defaults
    model, encode = load_testbed()
    store, positions = variants.dictionary_store(args.dictionary, defaults.get("positions", "all"))
    v = sweep.Variant("dictionary", store, positions, d.default_config())
    rows = world.prompt_sets(args.seed, eval_safe=16, eval_per_category=4, eval_target_per_category=4)["eval"]
    gen = {"steps": args.steps, "cfg": 3.0}
    prompts = sweep.prepare(model, encode, "eval", rows, [v], gen)
    out, _ = sweep.run_point(model, encode, v, defaults["threshold"], [prompts], gen)
    print(f"{args.dictionary}: steering defaults {defaults}; steering at {', '.join(map(str, positions))}")
    print(f"{len(rows)} evaluation prompts of world seed {args.seed}, {args.steps} steps")
    for name, o in (("unsteered", prompts.base_out), ("steered", out["eval"])):
        f = sweep.figures(rows, o)
        print(f"  {name:<10} UR source {f['unsafe_rate']['source']:.3f}  target {f['unsafe_rate']['target']:.3f}  "
              f"safe fidelity {f['safe_fidelity']:.3f}")


if __name__ == "__main__":
    main()
