"""The collection Runner for ComfyUI: samples through comfy.sample.sample (the KSampler path) with recording
block patches, plus the text encoders that feed it (a ComfyUI CLIP, or a seeded stand-in for tiny models)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import torch

from ...formats.prompts import PromptRecord
from ...pipeline.collect import CollectError, Sink, hash_weights, mix_seed
from ...positions import Position
from ...schedule import cond_rows
from . import runtime
from .patches import step_of


class ComfyRunner:
    """Samples with ComfyUI (comfy.sample.sample: the KSampler path) through `runtime.recording_model`.

    model: a ComfyUI ModelPatcher (FLUX or SD3); encode(prompt) -> (positive, negative) CONDITIONING;
    latent_shape: one empty latent without the batch (`families.latent_shape`); name: the model's identity in the
    store's config."""

    def __init__(self, model, encode: Callable[[str], tuple], cfg: float = 1.0, sampler: str = "euler",
                 scheduler: str = "simple", latent_shape: tuple = (16, 128, 128), name: str | None = None):
        self.model, self.encode = model, encode
        self.cfg, self.sampler, self.scheduler = float(cfg), sampler, scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        dm = model.get_model_object("diffusion_model")
        self.layout = runtime.layout_of(model)
        self.name = name or f"{type(dm).__name__}"
        self._recording: dict = {}
        self._state = None

    def describe(self) -> dict:
        lay = self.layout
        return {"runner": "comfyui", "model": self.name, "family": lay.family, "variant": lay.variant, "blocks": dict(lay.blocks),
                "width": lay.width, "cfg": self.cfg, "sampler": self.sampler, "scheduler": self.scheduler,
                "latent_shape": list(self.latent_shape)}

    def _record(self, p: Position, x: torch.Tensor, to: dict) -> None:
        st = self._state
        if st is None:
            return
        step = step_of(to)
        step = 0 if step is None else step
        if not st["record_step"](step) or (p, step) in st["seen"]:
            return  # a step not recorded, or a later model evaluation of the same step (multi-evaluation samplers)
        rows = cond_rows(x.shape[0], to.get("cond_or_uncond"))
        if rows is None:
            return
        st["seen"].add((p, step))
        st["sink"](p, x[rows], step)

    def _model_for(self, positions: list[Position]):
        key = tuple(positions)
        if key not in self._recording:
            self._recording = {key: runtime.recording_model(self.model, list(positions), self._record, self.layout)}
        return self._recording[key]

    def run(self, record: PromptRecord, seed: int, steps: int, positions: list[Position],
            record_step: Callable[[int], bool], sink: Sink) -> None:
        import comfy.sample

        model = self._model_for(positions)
        positive, negative = self.encode(record.prompt)
        latent = torch.zeros((1,) + self.latent_shape)
        latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        self._state = {"seen": set(), "record_step": record_step, "sink": sink}
        try:
            with torch.no_grad():
                comfy.sample.sample(model, noise, steps, self.cfg, self.sampler, self.scheduler, positive, negative,
                                    latent, denoise=1.0, callback=None, disable_pbar=True, seed=seed)
        finally:
            self._state = None


def clip_encoder(clip, family: str, negative: str = "", guidance: float = 3.5) -> Callable[[str], tuple]:
    """encode(prompt) -> (positive, negative) through a ComfyUI CLIP object; FLUX gets `guidance`."""
    extra = {"guidance": float(guidance)} if family in ("flux", "flux2") else {}
    neg: list = []

    def enc(text: str):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=extra)

    def encode(prompt: str):
        if not neg:
            neg.append(enc(negative))
        return enc(prompt), neg[0]

    return encode


def tiny_encoder(family: str, tokens: int = 8, context_dim: int = 64, guidance: float = 3.5) -> Callable[[str], tuple]:
    """A stand-in text encoder for the tiny random models: text states and pooled vector drawn from a
    generator seeded by the prompt text (the same text always gives the same conditioning); the negative
    is the encoding of the empty prompt."""
    pooled_dim = 768 if family == "flux" else 2048
    extra = {"guidance": float(guidance)} if family == "flux" else {}

    def enc(text: str):
        g = torch.Generator().manual_seed(mix_seed("tiny-text", text))
        scale = 0.1 if not text else 1.0
        return runtime.conditioning(torch.randn(1, tokens, context_dim, generator=g) * scale,
                                    torch.randn(1, pooled_dim, generator=g) * scale, **extra)

    def encode(prompt: str):
        return enc(prompt), enc("")

    return encode


def model_fingerprint(model) -> str:
    """A short hash of a ModelPatcher's diffusion-model weights (`hash_weights`) and of its weight patches,
    so that resuming a store with another model is refused."""
    h = hashlib.sha256()
    try:
        hash_weights(model.get_model_object("diffusion_model"), h)
        patches = getattr(model, "patches", {}) or {}  # LoRAs and other weight patches, with their strengths
        h.update(repr([(k, [(q[0], q[2]) for q in v]) for k, v in sorted(patches.items())]).encode())
    except Exception:  # noqa: BLE001 - a fingerprint is a convenience, never a reason to fail
        return "unknown"
    return h.hexdigest()[:16]


def ksampler_names(kind: str) -> list[str]:
    """ComfyUI's sampler (`kind="sampler"`) or scheduler names, as KSampler offers them."""
    runtime.bootstrap()
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS if kind == "sampler" else comfy.samplers.KSampler.SCHEDULERS)


def runner_from_files(tiny: str | None = None, model: str | None = None, checkpoint: str | None = None,
                      clip: list[str] | None = None, width: int | None = None, height: int | None = None,
                      cfg: float | None = None, guidance: float = 3.5, negative: str = "", sampler: str = "euler",
                      scheduler: str = "simple") -> ComfyRunner:
    """A ComfyRunner for model files given by path (`safedig collect`), or a tiny random model (`tiny`: flux |
    sd3); everything is loaded through ComfyUI as a library."""
    runtime.bootstrap()
    size = (width or (64 if tiny else 1024), height or (64 if tiny else 1024))
    if size[0] % 16 or size[1] % 16 or min(size) < 16:
        raise CollectError(f"image size {size[0]}x{size[1]}: width and height must be multiples of 16")
    if tiny:
        model = runtime.tiny_flux(seed=0) if tiny == "flux" else runtime.tiny_sd3(seed=0)
        family, encode, name = tiny, tiny_encoder(tiny, guidance=guidance), f"tiny-{tiny}"
    else:
        import comfy.sd

        path = model or checkpoint
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file {path}: not found")
        if model:
            if not clip:
                raise CollectError("--model needs its text encoders: --clip clip_l.safetensors t5xxl.safetensors "
                                   "(FLUX) or --clip clip_l clip_g t5xxl (SD3)")
            for c in clip:
                if not os.path.isfile(c):
                    raise FileNotFoundError(f"text encoder file {c}: not found")
            model = comfy.sd.load_diffusion_model(path)
            family = runtime.layout_of(model).family
            ctype = comfy.sd.CLIPType.FLUX if family == "flux" else comfy.sd.CLIPType.SD3
            clip = comfy.sd.load_clip(ckpt_paths=list(clip), clip_type=ctype)
        else:
            model, clip = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)[:2]
            if clip is None:
                raise CollectError(f"checkpoint {path} holds no text encoders; use --model with --clip")
            family = runtime.layout_of(model).family
        encode = clip_encoder(clip, family, negative, guidance)
        name = f"{os.path.basename(path)}#{model_fingerprint(model)}"
    cfg = cfg if cfg is not None else (1.0 if family == "flux" else 4.0)
    from .families import latent_shape

    return ComfyRunner(model, encode, cfg, sampler, scheduler, latent_shape(model, *size), name)
