"""Where one model call sits in the sampler: its step and schedule progress (the steering window's unit),
whether it is inside a window, and which batch rows are the cond and uncond halves. Shared by steering,
recording and collection in every runtime."""
from __future__ import annotations

import torch
from torch import Tensor


def schedule_step(sigma: Tensor | float | None, sample_sigmas: Tensor | None) -> int | None:
    """Index of the sampler step `sigma` belongs to (of len(sample_sigmas) − 1 steps); intermediate sigmas of
    multi-evaluation samplers count as the step they are taken in. None when the schedule is unknown."""
    if sigma is None or sample_sigmas is None or len(sample_sigmas) < 2:
        return None
    s = float(sigma.max() if isinstance(sigma, Tensor) else sigma)
    sched = sample_sigmas.detach().float().cpu()
    i = int((sched[:-1] >= s * (1 - 1e-5)).sum()) - 1
    return min(max(i, 0), len(sched) - 2)


def schedule_progress(sigma: Tensor | float | None, sample_sigmas: Tensor | None) -> float | None:
    """Fraction of the sampler schedule reached at `sigma`: step i of n gives i/n (None: unknown)."""
    i = schedule_step(sigma, sample_sigmas)
    return None if i is None else i / (len(sample_sigmas) - 1)


def in_window(progress: float | None, cfg) -> bool:
    """Whether a call at `progress` lies in the window [cfg.start, cfg.end) of a SteeringConfig."""
    if progress is None:  # no schedule known (a bare forward call): the window cannot exclude it
        return True
    return cfg.start <= progress < cfg.end or (cfg.end >= 1.0 and progress >= cfg.start)


def chunk_size(batch: int, cond_or_uncond: list) -> int:
    """Rows per chunk of a model call's batch: ComfyUI stacks equal chunks, one per entry of `cond_or_uncond`
    (0 = cond, 1 = uncond)."""
    chunks = len(cond_or_uncond)
    if batch % chunks:
        raise ValueError(f"batch of {batch} cannot be split into {chunks} cond/uncond chunks")
    return batch // chunks


def half_rows(batch: int, cond_or_uncond: list | None, apply_to: str) -> Tensor | None:
    """Boolean mask over the batch of the rows to steer (None: all)."""
    if apply_to == "both":
        return None
    if not cond_or_uncond:
        raise ValueError(f"apply_to={apply_to!r} needs to know which batch rows are cond and uncond, "
                         "and this model call does not say (no cond_or_uncond)")
    per = chunk_size(batch, cond_or_uncond)
    want = 0 if apply_to == "cond" else 1
    return torch.tensor([c == want for c in cond_or_uncond]).repeat_interleave(per)


def cond_rows(batch: int, cond_or_uncond) -> slice | None:
    """Rows of the first cond chunk of a model call (None: the call holds no cond)."""
    if not cond_or_uncond:
        return slice(0, batch)
    per = chunk_size(batch, cond_or_uncond)
    for j, c in enumerate(cond_or_uncond):
        if c == 0:
            return slice(j * per, (j + 1) * per)
    return None


def image_max(values: Tensor, cond_or_uncond) -> Tensor:
    """Per image of a model call, the max of a per-row statistic `values` [B] over its cond rows → [images].
    The uncond rows hold the negative prompt, what the image is pushed away from, so they never count;
    a call with no cond chunk gives −inf for every image, and one that does not say its chunks treats each
    row as an image."""
    if not cond_or_uncond:
        return values
    per = chunk_size(values.shape[0], cond_or_uncond)
    cond = [j for j, c in enumerate(cond_or_uncond) if c == 0]
    if not cond:
        return values.new_full((per,), float("-inf"))
    return values.view(len(cond_or_uncond), per)[cond].amax(0)


def image_to_rows(per_image: Tensor, cond_or_uncond) -> Tensor:
    """A per-image value [images] repeated onto every row of a model call's batch (each chunk holds the same
    images in the same order)."""
    return per_image if not cond_or_uncond else per_image.repeat(len(cond_or_uncond))
