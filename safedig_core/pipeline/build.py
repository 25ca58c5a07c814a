"""`safedig build`: route → train → adapt, from one activation store to one safety dictionary file.

Each stage is its own module (routing, train, harmful, adapt); this one only chains them, keeps their
outputs in a work folder (so an interrupted build resumes: training checkpoints are picked up, finished
stages are not redone), and writes the final file atomically with the routing result in its provenance.

The work folder remembers what it was made from (`work.json`: the store's fingerprint and the build
settings); a work folder of another store or other settings is refused, never resumed. An existing
dictionary file is replaced only when the caller asks (`overwrite=True`). Training needs autograd: the
build runs with inference mode off and gradients on, whatever the caller (ComfyUI runs every node under
`torch.inference_mode()`).
"""
from __future__ import annotations

import dataclasses
import hashlib
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
from .harmful import harmful_peaks

SOURCE_DICTIONARY = "source_dictionary.safetensors"  # in the work folder: the dictionary before adaptation
WORK_MANIFEST = "work.json"  # in the work folder: the store and settings it was made from


class BuildError(ValueError):
    """A build that must not start: it would replace a file or resume someone else's work."""


@dataclass
class BuildConfig:
    top_k: int = 3
    positions: list[str] | None = None  # skip routing and use these
    train: train.TrainConfig = field(default_factory=train.TrainConfig)
    adapt: adapt_mod.AdaptConfig | None = field(default_factory=adapt_mod.AdaptConfig)  # None: no adaptation
    # re-score harmful latents on the target set: guarded | union | rescore | reselect | None (`adapt.rescore_harmful`;
    # guarded, the union that keeps the per-image gate's separation, since held-out seeds 11-13: docs/METHOD_NOTES.md)
    rescore: str | None = "guarded"
    routing: routing.RoutingConfig = field(default_factory=routing.RoutingConfig)
    # gate units: this quantile of harmful mass on safe source tokens, and of its max over each safe source
    # image's tokens (per prompt and step) for the per-image gate (None: 1 and no per-image unit)
    gate_quantile: float | None = 0.99
    steering_defaults: dict = field(default_factory=lambda: {"blend": 1.0, "repel": 1.0, "threshold": 1.0})
    # the pooled text vector (`input.pooled`), where the store holds it, is not routed (one vector per prompt) but
    # added to the routed positions (False: left out)
    pooled: bool = True
    # at the pooled text vector (`input.pooled`): Blend's targets are the vectors of up to this many safe prompts
    # of the store, either domain (0: the SAE's safe reconstruction, as at every other position)
    safe_exemplars: int = 4096


def store_fingerprint(store) -> str:
    """sha256 over what makes a store's content: its identity (family, positions, widths, dtype, collection
    settings, prompt list) and the checksums of its shards. Two stores with equal fingerprints hold the
    same rows; the fingerprint names a store in provenance without naming a path on the builder's machine."""
    m = getattr(store, "manifest", {}) or {}
    ident = {k: m.get(k) for k in sorted(m) if k not in ("shards", "complete", "updated", "created")}
    ident["shards"] = [s.get("sha256") for s in m.get("shards", [])]
    ident["prompts"] = [r.to_json() for r in store.prompts]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def _settings(cfg: BuildConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str))


def _claim_work_dir(work_dir: str, identity: dict, write: bool = True) -> None:
    """Record what the work folder is for, or refuse one made for another store or other settings."""
    path = os.path.join(work_dir, WORK_MANIFEST)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                had = json.load(f)
        except (OSError, ValueError):
            had = None
        if had != identity:
            what = "another store" if not isinstance(had, dict) or had.get("store") != identity["store"] \
                else "other settings (" + ", ".join(_changed(had.get("settings"), identity["settings"])) + ")"
            raise BuildError(f"work folder {os.path.basename(work_dir)} holds a build from {what}; "
                             "delete it or give another work folder to start afresh")
    elif os.path.isdir(work_dir) and os.listdir(work_dir):
        raise BuildError(f"work folder {os.path.basename(work_dir)} is not empty and was not made by "
                         "`safedig build`; give another work folder")
    if write:
        os.makedirs(work_dir, exist_ok=True)
        write_text(path, json.dumps(identity, indent=1, sort_keys=True))


def _changed(old, new, prefix="") -> list[str]:
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [prefix.rstrip(".") or "settings"] if old != new else []
    out = []
    for k in sorted(set(old) | set(new)):
        out += _changed(old.get(k), new.get(k), f"{prefix}{k}.")
    return out[:4] + (["..."] if len(out) > 4 else [])


def build(store, out_path: str, cfg: BuildConfig | None = None, work_dir: str | None = None,
          progress: bool = True, should_stop=None, device=None, overwrite: bool = False,
          ranks: Ranks = SINGLE) -> dict:
    """Build `out_path` from `store`; returns a summary (routing, per-position training and adaptation
    metrics). `should_stop()` interrupts between and inside stages (KeyboardInterrupt). An existing
    `out_path` is refused unless `overwrite`. With several `ranks` (torchrun) every rank routes (the same
    result), training and adaptation give each position a team of ranks (one rank each while there are no more
    ranks than positions, several data-parallel beyond that: `distributed.Ranks.assign`), and rank 0 writes
    the files."""
    cfg = cfg or BuildConfig()
    if os.path.isdir(out_path):
        raise BuildError(f"{os.path.basename(out_path) or out_path} is a folder; give a dictionary file name")
    if os.path.exists(out_path) and not overwrite:
        raise BuildError(f"dictionary {os.path.basename(out_path)} already exists; ask to overwrite it "
                         "(--overwrite / the node's overwrite input) or choose another name")
    work_dir = work_dir or os.path.splitext(out_path)[0] + ".work"
    fingerprint = store_fingerprint(store)
    identity = {"store": fingerprint, "settings": _settings(cfg)}
    if ranks.main:
        _claim_work_dir(work_dir, identity)
    ranks.barrier()  # the others check only once rank 0 has claimed it (not while its work.json is being written)
    if not ranks.main:
        _claim_work_dir(work_dir, identity, write=False)
    with torch.inference_mode(False), torch.enable_grad():
        return _build(store, fingerprint, out_path, cfg, work_dir, progress, should_stop, device, ranks)


def _build(store, fingerprint, out_path, cfg, work_dir, progress, should_stop, device, ranks) -> dict:
    if cfg.positions:
        selected = list(cfg.positions)
        report = None
    else:
        names = [str(n) for n in store.positions]
        pooled = [n for n in names if parse(n).kind == "pooled"]
        report = routing.route(store, cfg.top_k, cfg.routing, positions=[n for n in names if n not in pooled])
        if ranks.main:
            report.save(work_dir)
        selected = report.selected + (pooled if cfg.pooled else [])
    positions = [parse(n) for n in selected]

    source_dict = os.path.join(work_dir, SOURCE_DICTIONARY)
    store_name = os.path.basename(os.path.normpath(getattr(store, "path", "") or "")) or None
    provenance = {"built_by": "safedig build", "store": store_name, "store_sha256": fingerprint,
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
    calibrate(d, store, cfg)
    d.steering_defaults = dict(cfg.steering_defaults)
    d.variant = (getattr(store, "config", {}).get("runner") or {}).get("variant")  # the model config it was made on
    d.provenance = dict(d.provenance, **provenance, adapted=bool(adapted),
                        routing={"selected": selected, "best_fixed": report.best_fixed} if report else None)
    save(d, out_path)
    write_text(os.path.join(work_dir, "build.json"), json.dumps(summary, indent=1, default=float))
    ranks.barrier()
    return summary


def calibrate(d, store, cfg: BuildConfig) -> None:
    """What `build` measures on the store for a trained dictionary `d`, in place: each position's gate units
    (`gate_units`, unless `cfg.gate_quantile` is None) and, at `input.pooled`, its safe exemplars."""
    for p, e in d.entries.items():
        if cfg.gate_quantile is not None:
            e.gate_scale, e.image_gate_scale = gate_units(store, p, e.steerer(), cfg.gate_quantile)
            e.metrics["gate_scale"], e.metrics["image_gate_scale"] = e.gate_scale, e.image_gate_scale
        if p.kind == "pooled" and cfg.safe_exemplars:
            e.safe_targets = safe_exemplars(store, p, cfg.safe_exemplars)
            e.metrics["safe_targets"] = int(e.safe_targets.shape[0]) if e.safe_targets is not None else 0


@torch.no_grad()
def gate_units(store, p, steerer, quantile: float, max_batches: int = 64) -> tuple[float, float]:
    """The units of the steering threshold at `p`, each the `quantile` of its gate's statistic over safe
    source data, so that τ = 1 leaves (1 − quantile) of it untouched: (per token: the harmful mass of a token;
    per image: the max of that mass over one prompt's stored tokens at one sampler step)."""
    safe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "safe"]
    unsafe = [i for i, r in enumerate(store.prompts) if r.domain == "source" and r.label == "unsafe"]
    tokens, images = {}, {}
    for name, idx in (("safe", safe), ("unsafe", unsafe)):
        tokens[name], images[name] = harmful_peaks(store, p, steerer, idx, max_batches)
    return _unit(tokens, quantile), _unit(images, quantile)


def safe_exemplars(store, p, limit: int):
    """One vector per safe prompt of the store (either domain) at `p`, its mean over the recorded steps, at most
    `limit` of them (the first ones); None when the store has no safe prompt."""
    safe = [i for i, r in enumerate(store.prompts) if r.label == "safe"][:limit]
    if not safe:
        return None
    pooled = store.pooled(p, prompts=safe)
    _, group = torch.unique(pooled.prompt, return_inverse=True)
    count = torch.zeros(int(group.max()) + 1).index_add_(0, group, torch.ones(len(group)))
    sums = torch.zeros(len(count), pooled.x.shape[1]).index_add_(0, group, pooled.x)
    return sums / count[:, None]


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
