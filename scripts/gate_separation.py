"""How far apart a per-image gate puts safe and risky prompts, for several choices of detecting positions, on
one finished seed of `safedig demo` (its dictionaries, its prompts): the development tool behind the gate
choices in docs/METHOD_NOTES.md. Run it on development seeds only (`safedig_core.testbed.seeds.DEVELOPMENT_SEEDS`).

    python scripts/gate_separation.py --demo out/demo --seed 0 [--quick]

Per detector choice and prompt set: quantiles of the per-image peak (τ units) of safe, unsafe source and
unsafe target prompts, and at τ = the largest safe building peak, the share of risky evaluation prompts the
gate would leave alone.
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--quick", action="store_true", help="the demo ran with --quick")
    args = ap.parse_args(argv)

    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.steering import SteeringConfig
    from safedig_core.testbed import demo, sweep, variants, world
    from safedig_core.testbed.model import load_testbed

    size = demo.SIZES["quick" if args.quick else "full"]
    seed_dir = os.path.join(args.demo, f"seed-{args.seed}")
    sets = world.prompt_sets(args.seed, **size["sets"])
    cal = demo.calibration_rows(sets["build"], **size["calibration"])
    model, encode = load_testbed()
    cfg = SteeringConfig(blend=1.0, repel=1.0, gate="image")
    adapted = variants.dictionary_store(os.path.join(seed_dir, "testbed_dictionary.safetensors"))
    source = variants.dictionary_store(os.path.join(seed_dir, "work", "build", "source_dictionary.gated.safetensors"))
    names = [p.name for p in adapted[1]]
    text = ",".join(n for n in names if n.endswith(".txt"))
    choices = {"first text position": (adapted, variants.with_detector(cfg, adapted[1]).detect),
               "every text position": (adapted, text), "every position": (adapted, ",".join(names)),
               "first text position, source dictionary": (source,
                                                          variants.with_detector(cfg, source[1]).detect)}
    vs = [sweep.Variant(k, st[0], st[1], cfg.with_(detect=det)) for k, (st, det) in choices.items()]
    gen = {"steps": size["steps"], "cfg": demo.CFG_SCALE}
    psets = {name: sweep.prepare(model, encode, name, rows, vs, gen) for name, rows in (("build", cal),
                                                                                       ("eval", sets["eval"]))}
    for v in vs:
        print(f"\n## {v.name} (detect={v.base.detect})")
        q = demo.gate_peaks(v.name, psets)
        for split, groups in q.items():
            print(f"  {split}: " + "; ".join(f"{k} {v_}" for k, v_ in groups.items()))
        tau = float(np.max([p for p, r in zip(psets["build"].peaks[v.name], cal) if r["label"] == "safe"]))
        ev = psets["eval"]
        for dom in ("source", "target"):
            idx = [i for i, r in enumerate(ev.rows) if r["label"] == "unsafe" and r["domain"] == dom]
            print(f"  at τ = {tau:.3f} (largest safe building peak): {dom} risky eval prompts left alone "
                  f"{np.mean(ev.peaks[v.name][idx] <= tau):.3f}")
        idx = [i for i, r in enumerate(ev.rows) if r["label"] == "safe"]
        print(f"  safe eval prompts above it {np.mean(ev.peaks[v.name][idx] > tau):.3f}")


if __name__ == "__main__":
    main()
