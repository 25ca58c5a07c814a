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
    # gate units: this quantile of harmful mass on safe source tokens, and of its max over each safe source
    # image's tokens (per prompt and step) for the per-image gate (None: 1 and no per-image unit)
    gate_quantile: float | None = 0.99
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
            e.gate_scale, e.image_gate_scale = gate_units(store, p, e.steerer(), cfg.gate_quantile)
            e.metrics["gate_scale"], e.metrics["image_gate_scale"] = e.gate_scale, e.image_gate_scale
    d.steering_defaults = dict(cfg.steering_defaults)
    d.variant = (getattr(store, "config", {}).get("runner") or {}).get("variant")  # the model config it was made on
    d.provenance = dict(d.provenance, **provenance, adapted=bool(adapted),
                        routing={"selected": selected, "best_fixed": report.best_fixed} if report else None)
    save(d, out_path)
    write_text(os.path.join(work_dir, "build.json"), json.dumps(summary, indent=1, default=float))
    ranks.barrier()
    return summary


@torch.no_grad()
def gate_units(store, p, steerer, quantile: float, max_batches: int = 64) -> tuple[float, float]:
    """The units of the steering threshold at `p`, each the `quantile` of its gate's statistic over safe
    source data, so that τ = 1 leaves (1 − quantile) of it untouched: (per token: the harmful mass of a token;
    per image: the max of that mass over one prompt's stored tokens at one sampler step)."""
    safe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "safe"]
    unsafe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "unsafe"]
    tokens, images = {}, {}
    for name, idx in (("safe", safe), ("unsafe", unsafe)):
        mass, prompt, step = [], [], []
        for _, b in zip(range(max_batches), store.iter_batches(p, 4096, prompts=idx)):
            mass.append(steerer.harmful_mass(b.x).float())
            prompt.append(b.prompt)
            step.append(b.step)
        tokens[name] = torch.cat(mass) if mass else torch.zeros(0)
        images[name] = _image_max(tokens[name], torch.cat(prompt), torch.cat(step)) if mass else torch.zeros(0)
    return _unit(tokens, quantile), _unit(images, quantile)


def _image_max(mass, prompt, step):
    """Max of `mass` per (prompt, step) group of rows."""
    _, group = torch.unique(torch.stack([prompt.long(), step.long()], 1), dim=0, return_inverse=True)
    out = torch.full((int(group.max()) + 1,), float("-inf"))
    return out.scatter_reduce(0, group, mass, "amax")


def _unit(values: dict, quantile: float) -> float:
    q = float(torch.quantile(values["safe"], quantile)) if values["safe"].numel() else 0.0
    floor = 1e-3 * float(values["unsafe"].mean()) if values["unsafe"].numel() else 0.0
    return max(q, floor, 1e-6)


def gate_scale(store, p, steerer, quantile: float, max_batches: int = 64) -> float:
    """The per-token gate's unit at `p` (`gate_units`)."""
    return gate_units(store, p, steerer, quantile, max_batches)[0]


def image_gate_scale(store, p, steerer, quantile: float, max_batches: int = 64) -> float:
    """The per-image gate's unit at `p` (`gate_units`)."""
    return gate_units(store, p, steerer, quantile, max_batches)[1]
