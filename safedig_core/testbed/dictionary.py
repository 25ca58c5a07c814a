"""The testbed's own safety dictionary, shipped in `assets/sae/` so the testbed workflow runs with nothing
downloaded: `python -m safedig_core.testbed.dictionary` rebuilds it.

It is made exactly as `safedig collect` + `safedig build` make any dictionary (the demo's steps 1-2, at the
demo's quick sizes): the world's building prompts (never its evaluation prompts) are sampled by the committed
testbed DiT through ComfyUI, their block outputs collected, routed, trained and adapted. Its `steering_defaults`
hold the operating point measured by the demo's rule (`set_operating_point`), which the bundled testbed
workflow uses.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from ..formats.prompts import PromptRecord
from . import ASSETS

PATH = os.path.join(ASSETS, "sae", "testbed_dictionary.safetensors")
SIZES = {"sets": {"build_safe": 32, "build_source_per_category": 16, "build_target_per_category": 6,
                  "build_target_safe": 6},
         "steps": 12, "record_steps": "0,0.25,0.5,0.75", "budget": 16, "train_steps": 300, "adapt_steps": 100,
         "batch": 512, "cfg": 3.0}


def records(rows: list[dict]) -> list[PromptRecord]:
    return [PromptRecord(f"{r['split']}-{i}", r["prompt"], r["label"], r["category"], r["domain"], r["seed"],
                         {"concept": r["concept"]}) for i, r in enumerate(rows)]


def build_dictionary(out: str = PATH, seed: int = 0, work: str | None = None, pooled: bool = False,
                     rescore: str | None = None) -> dict:
    """`pooled`: collect the pooled text vector too and steer as the demo does (its text positions and the pooled
    vector, `positions` "txt" in the steering defaults); measured, not what ships (docs/METHOD_NOTES.md).
    `rescore`: `BuildConfig.rescore` instead of its default."""
    from ..adapters.comfy.runner import ComfyRunner
    from ..formats.store import ActivationStore
    from ..pipeline.adapt import AdaptConfig
    from ..pipeline.build import BuildConfig, build
    from ..pipeline.collect import collect
    from ..pipeline.train import TrainConfig
    from . import world
    from .demo import block_positions
    from .model import load_testbed

    model, encode_fn = load_testbed()
    rows = world.prompt_sets(seed, **SIZES["sets"])["build"]
    with tempfile.TemporaryDirectory(prefix="safedig-testbed-dict-") as tmp:
        work = work or tmp
        runner = ComfyRunner(model, lambda p: encode_fn([p]), cfg=SIZES["cfg"],
                             latent_shape=(3, world.SIZE, world.SIZE), name="safedig-testbed")
        res = collect(runner, records(rows), block_positions(model, pooled), os.path.join(work, "store"), SIZES["steps"],
                      SIZES["record_steps"], SIZES["budget"], seed)
        tcfg = TrainConfig(expansion=8, k=8, steps=SIZES["train_steps"], batch_size=SIZES["batch"], seed=seed,
                           checkpoint_every=100)
        acfg = AdaptConfig(steps=SIZES["adapt_steps"], batch_size=SIZES["batch"], seed=seed)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        rules = BuildConfig(top_k=3, train=tcfg, adapt=acfg, **({} if rescore is None else {"rescore": rescore}))
        summary = build(ActivationStore(res.path), out, rules, os.path.join(work, "build"), progress=False,
                        overwrite=True)
    summary["steering_defaults"] = set_operating_point(out, model, encode_fn, rows, "txt" if pooled else "all")
    return summary


def set_operating_point(path: str, model, encode_fn, rows: list[dict], positions: str = "all") -> dict:
    """Store the demo's operating point in the dictionary's `steering_defaults`: the per-image gate decided at
    the steered text positions, τ by the demo's rule (`sweep.peak_rule`: 10 % above the largest peak over the
    safe building prompts, sampled as they were collected), steering at `positions` (Apply Steering's words:
    "all", "txt"). Returns the defaults written."""
    from ..formats.dictionary import load, save
    from ..steering import SteeringConfig
    from . import sweep, variants

    store, steered = variants.dictionary_store(path, positions)
    cfg = SteeringConfig(blend=1.0, repel=1.0, gate="image", detect="text")
    v = sweep.Variant("shipped", store, steered, cfg)
    safe = [r for r in rows if r["label"] == "safe"]
    pset = sweep.prepare(model, encode_fn, "build", safe, [v], {"steps": SIZES["steps"], "cfg": SIZES["cfg"]})
    d = load(path)
    d.steering_defaults = {"blend": cfg.blend, "repel": cfg.repel, "gate": cfg.gate, "detect": cfg.detect,
                           "threshold": sweep.peak_rule(pset, v.name)}
    if positions != "all":
        d.steering_defaults["positions"] = positions
    save(d, path)
    return d.steering_defaults


def write_prompts(folder: str, seed: int = 0) -> str:
    """The building prompts of the shipped dictionary as `testbed_prompts.jsonl` in `folder` (e.g. ComfyUI's
    input folder, for SafeDIG Collect Activations); an existing file is never overwritten."""
    import json

    from ..formats.atomic import write_text
    from . import world

    path = os.path.join(folder, "testbed_prompts.jsonl")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it or choose another folder")
    rows = world.prompt_sets(seed, **SIZES["sets"])["build"]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def main(argv=None) -> None:
    from ..pipeline.adapt import RESCORE_MODES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=PATH)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", metavar="FOLDER", help="only write the building prompts as FOLDER/testbed_prompts.jsonl")
    ap.add_argument("--pooled", action="store_true",
                    help="collect the pooled text vector too and steer as the demo does (not what ships)")
    ap.add_argument("--rescore", choices=RESCORE_MODES, default=None,
                    help="how adaptation re-scores the harmful latents (default: BuildConfig's)")
    args = ap.parse_args(argv)
    if args.prompts:
        print(f"wrote {write_prompts(args.prompts, args.seed)}")
        return
    if args.pooled and os.path.abspath(args.out) == os.path.abspath(PATH):
        raise SystemExit("--pooled: give --out; the shipped dictionary is built without it (docs/METHOD_NOTES.md)")
    summary = build_dictionary(args.out, args.seed, pooled=args.pooled, rescore=args.rescore)
    print(f"wrote {args.out}: positions {summary['positions']}; operating point {summary['steering_defaults']}")


if __name__ == "__main__":
    main()
