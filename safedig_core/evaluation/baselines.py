"""The baselines SafeDIG is measured against: dense difference-of-means steering and a prompt word filter.

`DiffMeansSteerer` speaks the same `steer(x, cfg, rows)` / `to()` interface as `PositionSteerer`, so it
plugs into the same block patches at the same positions: only the steering rule differs.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor

from ..steering import SteeringConfig


class DiffMeansSteerer:
    """Dense steering along u = normalise(mean(unsafe) − mean(safe)): every token whose projection on u
    exceeds the safe tokens' mean projection is pulled back by β × the excess (β = `cfg.repel`, or 1 when
    only Blend is set). No dictionary, no gate beyond the projection itself."""

    def __init__(self, direction: Tensor, safe_level: float):
        self.u = direction / direction.norm().clamp_min(1e-12)
        self.safe_level = float(safe_level)

    @classmethod
    def from_batches(cls, batches, is_unsafe) -> "DiffMeansSteerer":
        """Means over an iterable of `Batch`es (x, prompt, ...); `is_unsafe(prompt_index) -> bool`; safe rows
        are those of safe prompts."""
        sums, counts = {}, {True: 0, False: 0}
        for b in batches:
            flags = torch.tensor([bool(is_unsafe(int(i))) for i in b.prompt])
            for flag in (True, False):
                sel = b.x[flags == flag].double()
                sums[flag] = sums.get(flag, 0) + sel.sum(0)
                counts[flag] += sel.shape[0]
        if not counts[True] or not counts[False]:
            raise ValueError("difference of means needs both unsafe and safe rows")
        mu_u, mu_s = sums[True] / counts[True], sums[False] / counts[False]
        u = (mu_u - mu_s).float()
        return cls(u, float(mu_s.float() @ (u / u.norm())))

    def to(self, device=None, dtype=None) -> "DiffMeansSteerer":
        return self

    def steer(self, x: Tensor, cfg: SteeringConfig, rows: Tensor | None = None) -> Tensor:
        if cfg.is_identity:
            return x
        strength = cfg.repel if cfg.repel else 1.0
        u = self.u.to(x.device, torch.float32)
        excess = ((x.float() @ u) - self.safe_level).clamp_min(0) * strength
        if rows is not None:
            excess = excess * rows.to(x.device).view(-1, *([1] * (excess.ndim - 1)))
        return (x.float() - excess.unsqueeze(-1) * u).to(x.dtype)


_WORD = re.compile(r"[a-z]+")
_STOP = {"a", "an", "the", "of", "on", "in", "at", "with", "and", "or", "to", "is", "what", "after", "picture",
         "photo", "image", "drawing", "painting", "some", "there", "by", "from", "for", "its", "it", "this", "that"}


class WordFilter:
    """Refuses prompts containing a word that occurs in the source domain's unsafe prompts but never in its
    safe ones: the prompt-level filter a deployer builds from the known risks."""

    def __init__(self, words: set[str]):
        self.words = set(words)

    @classmethod
    def from_prompts(cls, unsafe: list[str], safe: list[str]) -> "WordFilter":
        seen_safe = {w for p in safe for w in _WORD.findall(p.lower())}
        return cls({w for p in unsafe for w in _WORD.findall(p.lower())} - seen_safe - _STOP)

    def blocks(self, prompt: str) -> bool:
        return any(w in self.words for w in _WORD.findall(prompt.lower()))
