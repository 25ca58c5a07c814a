"""Collection from a diffusers pipeline: a `collect.Runner` for the pipelines of the FLUX.1, SD3, Chroma, Flux.2,
Qwen-Image and Wan transformers (`FluxPipeline`, `StableDiffusion3Pipeline`, `ChromaPipeline`, ...). The adapter
also steers HunyuanImage 2.1, Lumina 2 / Z-Image and HiDream, whose pipelines batch guidance their own way
(HiDream stacks [uncond, cond], Z-Image [cond, uncond], HunyuanImage guides through a guider object); this runner
refuses them rather than store the wrong rows.

`collect()` is written against the Runner protocol; `ComfyRunner` samples through ComfyUI. This runner
samples through a diffusers pipeline instead and records through the diffusers adapter's hooks
(`hooks.record`), so a store - and the dictionaries built from it - can come from diffusers
without ComfyUI. What reaches the store is what ComfyRunner delivers: the cond rows of the first
transformer call of each sampler step. Diffusers' SD3 pipeline with guidance_scale > 1 stacks
[uncond, cond] in one call (the second half is kept); FluxPipeline with true_cfg_scale > 1, and the Chroma,
Qwen-Image and Wan pipelines with guidance, run the positive prompt's call first and the negative's second (the
first is kept); SD3's skip-layer guidance adds a later cond-only call (skipped, as the second call of its step).

Usage:
    runner = DiffusersRunner(pipe, guidance_scale=3.5, height=1024, width=1024)
    collect(runner, load_prompts("prompts.csv"), "all", "store/", steps=28, record_steps="0.25,0.5",
            token_budget=64, seed=0)
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable

import torch

from ...formats.prompts import PromptRecord
from ...pipeline.collect import CollectError, Sink, hash_weights
from ...positions import Position
from ...schedule import cond_rows
from .hooks import layout_of, record


class DiffusersRunner:
    """Samples one image per prompt with a diffusers pipeline (latents only, no VAE decode).

    encode(prompt) -> dict of pipeline kwargs (prompt_embeds, pooled_prompt_embeds, negative_...) replaces
    the pipeline's own text encoders (default: `prompt=` the text); guidance_scale/height/width: None takes
    the pipeline's defaults; name: the model's identity in the store's config (default: the transformer's
    `_name_or_path` and a fingerprint of its weights); options: further pipeline kwargs (true_cfg_scale,
    negative_prompt, max_sequence_length, ...), recorded in the store's config too."""

    def __init__(self, pipe, encode: Callable[[str], dict] | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, name: str | None = None, **options):
        self.pipe, self.encode, self.options = pipe, encode, options
        self.layout = layout_of(pipe.transformer)
        if self.layout.family in UNCOLLECTED:
            raise CollectError(f"DiffusersRunner does not collect from {self.layout.label} pipelines yet ({type(pipe).__name__}); "
                               "collect through ComfyUI (ComfyRunner), or record with hooks.record in your own loop")
        default = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
        self.guidance_scale = float(default if guidance_scale is None else guidance_scale)
        side = pipe.default_sample_size * pipe.vae_scale_factor
        self.height, self.width = int(height or side), int(width or side)
        self.name = name or _identity(pipe.transformer)

    def describe(self) -> dict:
        lay, pipe = self.layout, self.pipe
        sched = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        return {"runner": "diffusers", "pipeline": type(pipe).__name__, "model": self.name, "family": lay.family,
                "variant": lay.variant, "blocks": dict(lay.blocks), "width": lay.width, "device": _device(pipe).type,
                "dtype": str(pipe.transformer.dtype).removeprefix("torch."), "guidance_scale": self.guidance_scale,
                "image_height": self.height, "image_width": self.width, "scheduler": type(pipe.scheduler).__name__,
                "scheduler_config": json.loads(json.dumps(sched, default=repr)),
                "options": json.loads(json.dumps(self.options, default=repr))}

    def run(self, rec: PromptRecord, seed: int, steps: int, positions: list[Position],
            record_step: Callable[[int], bool], sink: Sink) -> None:
        pipe, seen = self.pipe, set()

        def on_block(p: Position, x: torch.Tensor, info: dict) -> None:
            if info["progress"] is None:
                raise CollectError(f"{type(pipe).__name__}: the transformer call's timestep is not in the "
                                   "scheduler's schedule; cannot tell its sampler step")
            step = round(info["progress"] * steps)
            if (p, step) in seen:
                return  # later calls of the same step: FLUX's true-CFG negative, SD3's skip-layer guidance
            seen.add((p, step))
            if record_step(step):
                sink(p, _cond_rows(pipe, self.layout.family, x), step)

        prompt = self.encode(rec.prompt) if self.encode else {"prompt": rec.prompt}
        generator = torch.Generator(_device(pipe)).manual_seed(seed)
        with record(pipe.transformer, positions, on_block, schedule=pipe.scheduler), torch.no_grad():
            pipe(**prompt, **self.options, num_inference_steps=steps, generator=generator, output_type="latent",
                 guidance_scale=self.guidance_scale, height=self.height, width=self.width)


UNCOLLECTED = ("hunyuan_image", "lumina2", "hidream")
STACKED_CFG = ("sd3",)  # pipelines that stack [uncond, cond] in one call; the others call once per prompt


def _cond_rows(pipe, family: str, x: torch.Tensor) -> torch.Tensor:
    """The cond half of a call: diffusers' SD3 pipeline with CFG stacks [uncond, cond] along the batch."""
    if family not in STACKED_CFG or not getattr(pipe, "do_classifier_free_guidance", False):
        return x
    if x.shape[0] % 2:
        raise CollectError(f"{type(pipe).__name__} guides with CFG but the transformer got an odd batch of "
                           f"{x.shape[0]}; cannot split it into [uncond, cond]")
    return x[cond_rows(x.shape[0], [1, 0])]


def _device(pipe) -> torch.device:
    return getattr(pipe, "_execution_device", None) or pipe.device


def _identity(transformer) -> str:
    """The transformer's `_name_or_path` (or class) and a short hash of a slice of its first, middle and last
    parameters, so that resuming a store with other weights is refused."""
    h = hashlib.sha256()
    hash_weights(transformer, h)
    path = getattr(transformer.config, "_name_or_path", None) or type(transformer).__name__
    return f"{path}#{h.hexdigest()[:16]}"
