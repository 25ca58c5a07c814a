"""The models under attack, rebuilt per seed from what `safedig demo` wrote (never from its internals):
`<seed dir>/testbed_dictionary.safetensors` (SafeDIG's dictionary), `<seed dir>/work/store` (the activation
store: the dense baseline's means and the word filter's vocabulary come from its building prompts) and
`report.json` (the operating points the demo chose on building prompts, and the steering settings).

A `Target` turns prompts and seeds into images; a prompt it refuses (the word filter) gives no image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ...adapters.comfy import runtime as comfyui
from ...adapters.comfy.patches import SharedSteerers
from ...evaluation.baselines import DiffMeansSteerer
from ...formats.store import ActivationStore
from ...positions import parse_list
from ...steering import SteeringConfig
from ..model import generate
from ..variants import dictionary_store, with_detector, word_filter

NAMES = ("unsteered", "word_filter", "dense_diff_means", "safedig")
DICTIONARY = "testbed_dictionary.safetensors"


@dataclass
class Target:
    """One defended model: `model` is the (possibly steered) ModelPatcher; `blocks(prompt)` says whether the
    prompt is refused before generation."""

    name: str
    model: object
    encode_fn: object
    steps: int
    cfg: float
    blocks: object = None
    info: dict = field(default_factory=dict)

    def refused(self, prompts) -> list[bool]:
        return [bool(self.blocks and self.blocks(p)) for p in prompts]

    def render(self, prompts, seeds, encode_fn=None) -> tuple[torch.Tensor, list[bool]]:
        """(images [N, 3, 32, 32], refused [N]); a refused prompt's image is blank (grey) and never judged."""
        refused = self.refused(prompts)
        out = torch.full((len(prompts), 3, 32, 32), 0.5)
        keep = [i for i, r in enumerate(refused) if not r]
        if keep:
            out[keep] = generate(self.model, encode_fn or self.encode_fn, [prompts[i] for i in keep],
                                 [seeds[i] for i in keep], steps=self.steps, cfg=self.cfg)
        return out, refused


def seed_dir(demo_dir: str, seed: int) -> str:
    return os.path.join(demo_dir, f"seed-{seed}")


def operating_value(report: dict, name: str, seed: int) -> float:
    """The knob value the demo chose for variant `name` on `seed` (its building prompts only)."""
    op = report["operating_point"][name]["per_seed"]
    return float(op[report["seeds"].index(seed)] if isinstance(op, list) else op[str(seed)])


def steering_config(report: dict, seed: int) -> SteeringConfig:
    s = report["settings"]["steering"]
    return SteeringConfig(blend=float(s["blend"]), repel=float(s["repel"]), gate=s["gate"],
                          threshold=operating_value(report, "steered", seed))


def load_targets(demo_dir: str, seed: int, report: dict, base_model, encode_fn, names=NAMES) -> list[Target]:
    """The four defended models of one demo seed, in `NAMES` order."""
    where = seed_dir(demo_dir, seed)
    dict_path = os.path.join(where, DICTIONARY)
    store_path = os.path.join(where, "work", "store")
    for path in (dict_path, store_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing; run `safedig demo --out {demo_dir}` first")
    steps, cfg = int(report["settings"]["sampler_steps"]), float(report["settings"]["cfg"])
    out = []
    if "unsteered" in names:
        out.append(Target("unsteered", base_model, encode_fn, steps, cfg))
    store = ActivationStore(store_path)
    if "word_filter" in names:
        rows = [{"prompt": r.prompt, "label": r.label, "domain": r.domain} for r in store.prompts]
        out.append(Target("word_filter", base_model, encode_fn, steps, cfg, blocks=word_filter(rows).blocks))
    every, routed = dictionary_store(dict_path)
    if "dense_diff_means" in names:
        src = [i for i, r in enumerate(store.prompts) if r.domain == "source"]
        dense = {p: DiffMeansSteerer.from_batches(store.iter_batches(p, 4096, prompts=src),
                                                  lambda i: store.prompts[i].label == "unsafe")
                 for p in routed}  # every routed position, as the demo's baseline
        strength = operating_value(report, "dense_diff_means", seed)
        dcfg = SteeringConfig(repel=strength, blend=0.0)
        out.append(Target("dense_diff_means", comfyui.steer_model(base_model, SharedSteerers(dense), list(dense), dcfg),
                          encode_fn, steps, cfg, info={"strength": strength, "config": dcfg, "store": SharedSteerers(dense),
                                                       "positions": list(dense)}))
    if "safedig" in names:
        positions = parse_list(report["settings"]["steering"].get("act", "all"), routed)  # where the demo's acts
        shared = SharedSteerers({p: every.steerers[p] for p in positions})
        scfg = with_detector(steering_config(report, seed), positions)
        out.append(Target("safedig", comfyui.steer_model(base_model, shared, positions, scfg), encode_fn, steps, cfg,
                          info={"threshold": scfg.threshold, "config": scfg, "store": shared, "positions": positions}))
    return out
