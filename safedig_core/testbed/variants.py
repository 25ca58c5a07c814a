"""The steering variants the demo measures: SafeDIG and every ablation and baseline, as `sweep.Variant`s.

Each ablation changes one thing against SafeDIG (routed positions, adapted decoders, Blend + Repel) and gets
the same gate-unit rule as `safedig build`, so that one τ means the same share of safe tokens' harmful
activity for all of them: fixed layer (the single best-separating position), no adaptation (the source
decoders), full retrain (SAEs trained from scratch on the target adaptation set), Blend only, Repel only,
dense difference of means (no dictionary, swept over strength) and the prompt word filter (no steering).
"""
from __future__ import annotations

import os

from ..adapters.comfy.patches import SharedSteerers
from ..evaluation.baselines import DiffMeansSteerer, WordFilter
from ..formats.dictionary import DictionaryEntry, SafetyDictionary, load, save
from ..formats.store import ActivationStore
from ..pipeline.build import SOURCE_DICTIONARY, BuildConfig, build, calibrate
from ..pipeline.harmful import find_harmful
from ..pipeline.train import TrainConfig, train_sae
from ..positions import INPUT_KINDS, parse, parse_list
from ..steering import SteeringConfig
from .sweep import Variant

ABLATIONS = ("token_gate", "fixed_layer", "no_adaptation", "full_retrain", "blend_only", "repel_only", "dense_diff_means",
             "word_filter")


def dictionary_store(path: str, positions=None) -> tuple[SharedSteerers, list]:
    """The steerers of a dictionary file at `positions`: None (all), names, or Apply Steering's words
    ("all", "txt", "img", a comma list: `positions.parse_list`)."""
    d = load(path)
    if isinstance(positions, str):
        chosen = parse_list(positions, d.positions, path)
    else:
        chosen = [p for p in d.positions if positions is None or p.name in positions]
    return SharedSteerers({p: d.entries[p].steerer() for p in chosen}), chosen


def full_retrain(store: ActivationStore, positions: list[str], work: str, tcfg: TrainConfig) -> str:
    """Ablation: SAEs trained from scratch on the target adaptation set, harmful latents scored there."""
    target = [i for i, r in enumerate(store.prompts) if r.domain == "target"]
    entries = {}
    for name in positions:
        p = parse(name)
        res = train_sae(store, tcfg, position=p, prompts=target,
                        checkpoint=os.path.join(work, f"{name}.ckpt.safetensors"))
        hs = find_harmful(res.sae, store, store.prompts, position=p, domain="target", batch_size=tcfg.batch_size)
        entries[p] = DictionaryEntry(p, res.sae.cpu(), hs.indices, hs.scores, hs.safe_values)
    path = os.path.join(work, "full_retrain.safetensors")
    save(SafetyDictionary(store.family, entries, {}, {"made_by": "safedig demo (full retrain ablation)"}), path)
    return path


def calibrated(store: ActivationStore, path: str) -> str:
    """A copy of dictionary `path` whose gate units, and safe exemplars at `input.pooled`, are set by the same rules
    as `safedig build`'s (`build.calibrate`)."""
    d = load(path)
    calibrate(d, store, BuildConfig())
    out = os.path.splitext(path)[0] + ".gated.safetensors"
    save(d, out)
    return out


def with_detector(cfg: SteeringConfig, positions: list) -> SteeringConfig:
    """Under the per-image gate, decide at the earliest routed text block position (text positions separate risk
    best, issue 13's prototype) when no steered block position runs before it; else each position decides
    itself. The DiT's inputs (`input.txt`, `input.pooled`), before every block, decide for themselves
    (`gate.plan`); detecting at `input.txt` was measured and lost to `double.0.txt` (docs/METHOD_NOTES.md), as
    did every routed position detecting (the union)."""
    if not cfg.image_gate:
        return cfg
    blocks = [p for p in positions if p.kind not in INPUT_KINDS]
    text = sorted((p for p in blocks if p.stream == "txt"), key=lambda p: p.call_order)
    if text and not any(p.call_order < text[0].call_order for p in blocks):
        return cfg.with_(detect=text[0].name)
    return cfg.with_(detect="each")


def word_filter(build_rows: list[dict]) -> WordFilter:
    return WordFilter.from_prompts([r["prompt"] for r in build_rows if r["label"] == "unsafe" and r["domain"] == "source"],
                                   [r["prompt"] for r in build_rows if r["label"] == "safe"])


def make(store: ActivationStore, dict_path: str, summary: dict, work: str, tcfg, acfg, steer: SteeringConfig,
         grid: tuple, strength_grid: tuple, act: str = "all") -> list[Variant]:
    """SafeDIG ("steered") and the steered ablations, in report order. `act`: "all" routed positions steer, or
    only those of one stream ("txt": the text positions and the pooled vector; the image positions then
    neither act nor detect)."""
    routed, best_fixed = summary["positions"], summary["routing"]["best_fixed"]
    acting = [p.name for p in parse_list(act, [parse(n) for n in routed])]  # Apply Steering's words: all, txt
    if best_fixed in routed:  # training and adaptation are per position and seeded alike: the same SAE
        fixed = dictionary_store(dict_path, [best_fixed])
    else:
        fixed_path = os.path.join(work, "fixed_layer.safetensors")
        build(store, fixed_path, BuildConfig(positions=[best_fixed], train=tcfg, adapt=acfg),
              os.path.join(work, "fixed"), progress=False, overwrite=True)
        fixed = dictionary_store(fixed_path)
    retrain = dictionary_store(calibrated(store, full_retrain(store, routed, os.path.join(work, "build"), tcfg)), acting)
    source = dictionary_store(calibrated(store, os.path.join(work, "build", SOURCE_DICTIONARY)), acting)
    src = [i for i, r in enumerate(store.prompts) if r.domain == "source"]
    dense = {}
    for name in routed:
        p = parse(name)
        dense[p] = DiffMeansSteerer.from_batches(store.iter_batches(p, 4096, prompts=src),
                                                 lambda i: store.prompts[i].label == "unsafe")
    main = dictionary_store(dict_path, acting)

    def gated(name, st, cfg):
        return Variant(name, st[0], st[1], with_detector(cfg, st[1]), "threshold", grid)

    return [gated("steered", main, steer),
            gated("token_gate", main, steer.with_(gate="token", detect="each")),
            gated("fixed_layer", fixed, steer),
            gated("no_adaptation", source, steer),
            gated("full_retrain", retrain, steer),
            gated("blend_only", main, steer.with_(repel=0.0)),
            gated("repel_only", main, steer.with_(blend=0.0)),
            Variant("dense_diff_means", SharedSteerers(dense), list(dense), SteeringConfig(repel=1.0), "strength",
                    strength_grid, gated=False)]
