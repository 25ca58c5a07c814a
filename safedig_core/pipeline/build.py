"""`safedig build`: route → train → adapt, from one activation store to one safety dictionary file.

Each stage is its own module (routing, train, harmful, adapt); this one only chains them, keeps their
outputs in a work folder (so an interrupted build resumes: training checkpoints are picked up, finished
stages are not redone), and writes the final file atomically with the routing result in its provenance.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..formats.atomic import write_text
from ..formats.dictionary import load, save
from ..positions import parse
from . import adapt as adapt_mod
from . import routing, train
from .distributed import SINGLE, Ranks

SOURCE_DICTIONARY = "source_dictionary.safetensors"  # in the work folder: the dictionary before adaptation


@dataclass
class BuildConfig:
    top_k: int = 3
    positions: list[str] | None = None  # skip routing and use these
    train: train.TrainConfig = field(default_factory=train.TrainConfig)
    adapt: adapt_mod.AdaptConfig | None = field(default_factory=adapt_mod.AdaptConfig)  # None: no adaptation
    rescore: str | None = "union"  # re-score harmful latents on the target set: rescore | union | reselect | None
    routing: routing.RoutingConfig = field(default_factory=routing.RoutingConfig)
    gate_quantile: float | None = 0.99  # gate unit: this quantile of harmful mass on safe source tokens (None: 1)
    steering_defaults: dict = field(default_factory=lambda: {"blend": 1.0, "repel": 1.0, "threshold": 1.0})


def build(store, out_path: str, cfg: BuildConfig | None = None, work_dir: str | None = None,
          progress: bool = True, should_stop=None, device=None, ranks: Ranks = SINGLE) -> dict:
    """Build `out_path` from `store`; returns a summary (routing, per-position training and adaptation
    metrics). `should_stop()` interrupts between and inside stages (KeyboardInterrupt). With several `ranks`
    (torchrun) every rank routes (the same result), training and adaptation deal the positions over the ranks,
    and rank 0 writes the files."""
    cfg = cfg or BuildConfig()
    work_dir = work_dir or os.path.splitext(out_path)[0] + ".work"
    os.makedirs(work_dir, exist_ok=True)

    if cfg.positions:
        selected = list(cfg.positions)
        report = None
    else:
        report = routing.route(store, cfg.top_k, cfg.routing)
        if ranks.main:
            report.save(work_dir)
        selected = report.selected
    positions = [parse(n) for n in selected]

    source_dict = os.path.join(work_dir, SOURCE_DICTIONARY)
    provenance = {"built_by": "safedig build", "store": os.path.abspath(getattr(store, "path", "") or ""),
                  "positions": selected}
    trained = train.train_store(store, os.path.join(work_dir, "train"), positions, cfg.train,
                                dictionary_path=source_dict, device=device, progress=progress,
                                should_stop=should_stop, provenance=provenance, auto_dead_tokens=True, ranks=ranks)
    has_target = any(getattr(r, "domain", "source") == "target" for r in store.prompts)
    adapted = {}
    if cfg.adapt is not None and has_target:
        adapted_path = os.path.join(work_dir, "adapted_dictionary.safetensors")
        adapted = adapt_mod.adapt_store(source_dict, store, adapted_path, positions, cfg.adapt,
                                        rescore=cfg.rescore, device=device, progress=progress,
                                        should_stop=should_stop, ranks=ranks)
    else:
        adapted_path = source_dict

    summary = {"dictionary": out_path, "positions": selected, "trained": trained, "adapted": adapted,
               "routing": json.loads(report.to_json()) if report else None}
    if not ranks.main:
        ranks.barrier()  # rank 0 writes the dictionary
        return summary
    d = load(adapted_path)
    if cfg.gate_quantile is not None:
        for p, e in d.entries.items():
            e.gate_scale = gate_scale(store, p, e.steerer(), cfg.gate_quantile)
            e.metrics["gate_scale"] = e.gate_scale
    d.steering_defaults = dict(cfg.steering_defaults)
    d.provenance = dict(d.provenance, **provenance, adapted=bool(adapted),
                        routing={"selected": selected, "best_fixed": report.best_fixed} if report else None)
    save(d, out_path)
    write_text(os.path.join(work_dir, "build.json"), json.dumps(summary, indent=1, default=float))
    ranks.barrier()
    return summary


@torch.no_grad()
def gate_scale(store, p, steerer, quantile: float, max_batches: int = 64) -> float:
    """The unit of the steering threshold at `p`: the `quantile` of harmful mass over safe source tokens,
    so that τ = 1 leaves (1 − quantile) of safe tokens' harmful activity untouched."""
    safe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "safe"]
    unsafe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "unsafe"]
    masses = {}
    for name, idx in (("safe", safe), ("unsafe", unsafe)):
        chunks = [steerer.harmful_mass(b.x) for _, b in zip(range(max_batches), store.iter_batches(p, 4096, prompts=idx))]
        masses[name] = torch.cat(chunks) if chunks else torch.zeros(0)
    q = float(torch.quantile(masses["safe"].float(), quantile)) if masses["safe"].numel() else 0.0
    floor = 1e-3 * float(masses["unsafe"].mean()) if masses["unsafe"].numel() else 0.0
    return max(q, floor, 1e-6)
