"""How well each dictionary of one finished `safedig demo` seed separates risky from safe building images at the
per-image gate's statistic, read from the seed's activation store (no image is generated): per position, the
size of the harmful set and the AUROC of the image peak (max harmful mass over an image's stored tokens at one
sampler step) of unsafe source and unsafe target prompts against safe source prompts, for the source dictionary
(before adaptation) and the adapted one (after `BuildConfig.rescore`); with `--guarded`, also the harmful set
`rescore="guarded"` would have kept from the adapted one's (`adapt.guarded_union`: the latents adaptation added,
one at a time, only where the AUROC of every unsafe prompt against the safe ones does not fall). The tool behind
the held-out seed 10 figures in docs/METHOD_NOTES.md.

    python scripts/harmful_separation.py --demo out/demo --seed 10 [--guarded]
"""
from __future__ import annotations

import argparse
import os

DICTIONARIES = (("source", os.path.join("work", "build", "source_dictionary.gated.safetensors")),
                ("adapted", "testbed_dictionary.safetensors"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", required=True, help="the --out folder of a finished `safedig demo` run")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--guarded", action="store_true", help="also the separation-guarded union (see above)")
    args = ap.parse_args(argv)

    import torch

    from safedig_core.formats.dictionary import load
    from safedig_core.formats.store import ActivationStore
    from safedig_core.pipeline.adapt import guarded_union
    from safedig_core.pipeline.harmful import harmful_peaks
    from safedig_core.pipeline.routing.scores import auroc
    from safedig_core.steering import PositionSteerer

    seed_dir = os.path.join(args.demo, f"seed-{args.seed}")
    store = ActivationStore(os.path.join(seed_dir, "work", "store"))
    groups = {key: [i for i, r in enumerate(store.prompts) if (r.label, r.domain) == key]
              for key in (("safe", "source"), ("unsafe", "source"), ("unsafe", "target"))}
    print(f"seed {args.seed}: {', '.join(f'{len(v)} {lab} {dom}' for (lab, dom), v in groups.items())} "
          "building prompts")

    def separation(p, steerer):
        peaks = {k: harmful_peaks(store, p, steerer, idx)[1] for k, idx in groups.items()}
        return tuple(auroc(peaks[("unsafe", d)], peaks[("safe", "source")]) for d in ("source", "target"))

    def show(name, p, n, sep):
        print(f"{name:8s} {p.name:14s} harmful {n:3d}  AUROC unsafe source {sep[0]:.3f}  unsafe target {sep[1]:.3f}",
              flush=True)

    loaded = {name: load(os.path.join(seed_dir, path)) for name, path in DICTIONARIES}
    for name, d in loaded.items():
        for p, e in d.entries.items():
            show(name, p, len(e.harmful), separation(p, e.steerer()))
    if args.guarded:
        for p, e in loaded["adapted"].entries.items():
            base = list(loaded["source"].entries[p].harmful)
            kept = guarded_union(e.sae, store, None, base, [j for j in e.harmful if j not in base], p)
            show("guarded", p, len(kept), separation(p, PositionSteerer(e.sae, torch.tensor(kept))))


if __name__ == "__main__":
    main()
