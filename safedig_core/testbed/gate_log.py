"""Which gate values a steered generation compared with τ, per image: what lets the demo's threshold sweep
(`sweep`) reuse an image between two τ exactly instead of generating it again.

A wrapper around each steerer (`_Logged`) writes the gate statistic it is about to compare into a `GateLog`,
then steers exactly as the steerer it wraps; `generate_logged` runs a batch through ComfyUI that way.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..adapters.comfy import runtime as comfyui
from ..schedule import image_max
from .model import generate


class GateLog:
    """Every value of a gated variant's statistic that a generation compares with τ, per image (τ units).

    A trajectory made at τ₁ is the one τ₂ makes, bit for bit, when none of its logged values lies between
    τ₁ and τ₂: every decision (image flagged, token steered) is then the same at every model call, and what
    a flagged image or a steered token becomes does not depend on τ. Logging more values than the gate
    compares (the per-token gate: every row's tokens, uncond rows too) can only mark more images for
    regeneration, never fewer."""

    def __init__(self):
        self.offset, self.images = 0, 1
        self.values: dict[int, list] = {}

    def add(self, per_image: Tensor) -> None:
        """`per_image` [images, m] (or [images]) for the images of the current generation batch."""
        per_image = per_image.detach().float().reshape(per_image.shape[0], -1)
        for b in range(per_image.shape[0]):
            self.values.setdefault(self.offset + b, []).append(per_image[b].cpu())

    def add_rows(self, per_row: Tensor) -> None:
        """Values of every row of a model call's batch [B, m]; rows are chunks of the same images."""
        per_row = per_row.reshape(per_row.shape[0], -1)
        n = self.images if per_row.shape[0] % self.images == 0 else per_row.shape[0]
        self.add(per_row.reshape(-1, n, per_row.shape[1]).transpose(0, 1).reshape(n, -1))

    def of(self, i: int) -> Tensor:
        found = self.values.get(i)
        return torch.cat(found) if found else torch.zeros(0)


class _Logged:
    """A steerer that writes its gate statistic into a `GateLog` before steering exactly as the one it wraps."""

    def __init__(self, inner, log: GateLog):
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def to(self, device=None, dtype=None):
        self.inner.to(device=device, dtype=dtype)
        return self

    def flag_images(self, x, cfg, cond_or_uncond=None):
        if len(self.inner.harmful):
            self.log.add(image_max(self.inner.image_mass(x), cond_or_uncond) / self.inner.image_gate_scale)
        return self.inner.flag_images(x, cfg, cond_or_uncond)

    def steer(self, x, cfg, rows=None, flagged=None):
        if len(self.inner.harmful) and x.numel() and not cfg.is_identity:
            if not cfg.image_gate:
                mass = self.inner.harmful_mass(x).float() / self.inner.gate_scale
                self.log.add_rows(mass.reshape(x.shape[0], -1) if x.dim() == 3 else mass.reshape(1, -1))
            elif flagged is None:  # the steerer decides for itself, each row an image
                self.log.add_rows(self.inner.image_mass(x)[:, None] / self.inner.image_gate_scale)
        return self.inner.steer(x, cfg, rows, flagged)


def generate_batches(model, encode_fn, rows, gen, tracker, batch: int = 64) -> torch.Tensor:
    """Images of `rows`, one generation per `batch` of them; before each, `tracker.offset` (and `images`) say
    which rows the batch holds, so a per-image record (`GateLog`, `sweep.PeakRecorder`) lands on the right one."""
    prompts, seeds, outs = [r["prompt"] for r in rows], [r["seed"] for r in rows], []
    for i in range(0, len(rows), batch):
        tracker.offset, tracker.images = i, len(prompts[i:i + batch])
        outs.append(generate(model, encode_fn, prompts[i:i + batch], seeds[i:i + batch], batch=batch, **gen))
    return torch.cat(outs) if outs else generate(model, encode_fn, [], [], **gen)


def generate_logged(model, encode_fn, store, positions, cfg, rows, gen, batch: int = 64):
    """Images of `rows` steered through `store` at `positions` with `cfg`, and each image's logged gate values."""
    log = GateLog()
    logged = type(store)({p: _Logged(st, log) for p, st in store.steerers.items()})
    images = generate_batches(comfyui.steer_model(model, logged, positions, cfg), encode_fn, rows, gen, log, batch)
    return images, [log.of(i) for i in range(len(rows))]
