"""The data side of SAE training, harmful-latent scoring and decoder adaptation: what they read (an activation
store, an in-memory matrix, batches from a callable or a list), the epoch stream over it, the checks every batch
passes, first moments of a stream, and the learning-rate decay the two optimisers share."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ..formats.store import Batch


class TrainError(ValueError):
    """Bad training input (empty data, NaN activations, width mismatch, bad config or checkpoint)."""


class MemorySource:
    """In-memory source of one position's rows (what `ActivationStore.iter_batches` gives) (tests, small sets, already loaded data).

    `prompt`/`step`/`token` default to 0 per row; `prompts` (PromptRecord-like objects with `label`,
    `category`, `domain`) are what `prompt` indexes. The position argument of `iter_batches` is ignored.
    """

    def __init__(self, x: Tensor, prompt: Tensor | None = None, step: Tensor | None = None,
                 token: Tensor | None = None, prompts: list | None = None):
        if x.ndim != 2:
            raise TrainError(f"activations must be a [rows, width] matrix, got shape {list(x.shape)}")
        n = x.shape[0]

        def col(v):
            v = torch.zeros(n, dtype=torch.long) if v is None else torch.as_tensor(v).long().reshape(-1)
            if v.shape[0] != n:
                raise TrainError(f"row metadata has {v.shape[0]} entries for {n} rows")
            return v

        self.x, self.prompt, self.step, self.token = x, col(prompt), col(step), col(token)
        self.prompts = list(prompts or [])

    def width(self, p=None) -> int:
        return self.x.shape[1]

    def rows(self, p=None) -> int:
        return self.x.shape[0]

    def iter_batches(self, p=None, batch_size: int = 4096, prompts=None, shuffle: bool = False,
                     seed: int = 0) -> Iterator[Batch]:
        rows = torch.arange(self.x.shape[0])
        if prompts is not None:
            keep = torch.zeros(int(self.prompt.max()) + 1 if len(self.prompt) else 0, dtype=torch.bool)
            want = torch.as_tensor(sorted(prompts), dtype=torch.long)
            want = want[want < len(keep)]
            keep[want] = True
            rows = rows[keep[self.prompt]] if len(keep) else rows[:0]
        if shuffle:
            rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
        for i in range(0, len(rows), batch_size):
            r = rows[i:i + batch_size]
            yield Batch(self.x[r].float(), self.prompt[r], self.step[r], self.token[r])


def batch_x(b: Any) -> Tensor:
    """The activation matrix of a batch (a store `Batch`, anything with `.x`, or a bare tensor)."""
    x = b if isinstance(b, Tensor) else getattr(b, "x", None)
    if not isinstance(x, Tensor):
        raise TrainError(f"a batch must be a tensor or have a tensor `.x`, got {type(b).__name__}")
    return x


class Stream:
    """Epochs of batches from any supported data object (see the module docstring)."""

    def __init__(self, data: Any, position: Any = None, batch_size: int = 4096, prompts: Any = None,
                 shuffle: bool = True, seed: int = 0):
        if isinstance(data, Tensor):
            data = MemorySource(data)
        self.data, self.position, self.batch_size = data, position, batch_size
        self.prompts, self.shuffle, self.seed = prompts, shuffle, seed
        self._one_shot_used = False

    def width(self) -> int | None:
        w = getattr(self.data, "width", None)
        if callable(w):
            try:
                return int(w(self.position))
            except Exception:  # noqa: BLE001 -- an unknown position is reported where the data are read
                return None
        return None

    def epoch(self, e: int) -> Iterator[Any]:
        d = self.data
        if hasattr(d, "iter_batches"):
            return iter(d.iter_batches(self.position, self.batch_size, prompts=self.prompts,
                                       shuffle=self.shuffle, seed=self.seed + e))
        if callable(d):
            return iter(d(e))
        it = iter(d)
        if it is d:  # a generator or other one-shot iterator
            if self._one_shot_used:
                raise TrainError("the data is a one-shot iterator and was used up; pass a list, a tensor, "
                                 "a callable epoch -> batches, or a store with iter_batches")
            self._one_shot_used = True
        return it


def checked(x: Tensor, d: int | None, where: str) -> Tensor:
    """`x` as a float32 [b, d] matrix, or a TrainError naming `where` and what is wrong."""
    if x.ndim != 2:
        raise TrainError(f"{where}: activations must be [rows, width], got shape {list(x.shape)}")
    if d is not None and x.shape[1] != d:
        raise TrainError(f"{where}: activation width {x.shape[1]} does not match the expected width {d}")
    x = x.float()
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(1).nonzero()[0, 0])
        raise TrainError(f"{where}: activations contain NaN or Inf (first at row {bad} of the batch)")
    return x


def domain_prompts(store: Any, domain: str) -> list[int]:
    return [i for i, r in enumerate(store.prompts) if getattr(r, "domain", "source") == domain]


def moments(stream: "Stream", n_batches: int, d: int | None, where, scale: float | None = None):
    """(width, rows, Σx [width], Σ‖x‖²) in float64 over the first `n_batches` batches of epoch 0, each
    checked (`where(i)` names batch i in errors); `scale` multiplies the rows first."""
    n, s1, s2, width = 0, None, None, d
    for i, b in enumerate(stream.epoch(0)):
        if i >= n_batches:
            break
        x = checked(batch_x(b), width, where(i)).double()
        if scale is not None:
            x = x * scale
        width = x.shape[1]
        if s1 is None:
            s1, s2 = torch.zeros(width, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        n += x.shape[0]
        s1 += x.sum(0).cpu()
        s2 += x.pow(2).sum().cpu()
    return width, n, s1, s2


def linear_decay(lr: float, step: int, steps: int, decay_start: float) -> float:
    """`lr`, decayed linearly to 0 over the steps after the fraction `decay_start` of `steps`."""
    start = int(decay_start * steps)
    if step < start or start >= steps:
        return lr
    return lr * (steps - step) / (steps - start)
