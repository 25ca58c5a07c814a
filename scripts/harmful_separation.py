"""How well each dictionary of one finished `safedig demo` seed separates risky from safe building images at the
per-image gate's statistic, read from the seed's activation store (no image is generated): per position, the
size of the harmful set and the AUROC of the image peak (max harmful mass over an image's stored tokens at one
sampler step) of unsafe source and unsafe target prompts against safe source prompts, for the source dictionary
(before adaptation) and the adapted one (after `BuildConfig.rescore`). The tool behind the held-out seed 10
figures in docs/METHOD_NOTES.md.

    python scripts/harmful_separation.py --demo out/demo --seed 10
"""
from __future__ import annotations

import argparse
import os

DICTIONARIES = (("source", os.path.join("work", "build", "source_dictionary.gated.safetensors")),
                ("adapted", "testbed_dictionary.safetensors"))


def auroc(high, low) -> float:
    """P(a value of `high` exceeds one of `low`), ties counting half."""
    return float((high[:, None] > low[None, :]).float().mean() + 0.5 * (high[:, None] == low[None, :]).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    args = ap.parse_args(argv)

    from safedig_core.formats.dictionary import load
    from safedig_core.formats.store import ActivationStore
    from safedig_core.pipeline.build import harmful_peaks

    seed_dir = os.path.join(args.demo, f"seed-{args.seed}")
    store = ActivationStore(os.path.join(seed_dir, "work", "store"))
    groups = {key: [i for i, r in enumerate(store.prompts) if (r.label, r.domain) == key]
              for key in (("safe", "source"), ("unsafe", "source"), ("unsafe", "target"))}
    print(f"seed {args.seed}: {', '.join(f'{len(v)} {lab} {dom}' for (lab, dom), v in groups.items())} "
          "building prompts")
    for name, path in DICTIONARIES:
        d = load(os.path.join(seed_dir, path))
        for p, e in d.entries.items():
            steerer = e.steerer()
            peaks = {k: harmful_peaks(store, p, steerer, idx)[1] for k, idx in groups.items()}
            safe = peaks[("safe", "source")]
            src, tgt = (auroc(peaks[("unsafe", d)], safe) for d in ("source", "target"))
            print(f"{name:8s} {p.name:14s} harmful {len(e.harmful):3d}  AUROC unsafe source {src:.3f}  "
                  f"unsafe target {tgt:.3f}")


if __name__ == "__main__":
    main()
