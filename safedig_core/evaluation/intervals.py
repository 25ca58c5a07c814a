"""Means with 95 % intervals for figures measured over several seeds, each on a set of prompts.

Two sources of uncertainty, reported side by side:
- over seeds: each seed is a fresh prompt draw, DiT noise and SAE training, so the per-seed values are
  independent repeats of the whole experiment; the interval is the Student-t one on their mean;
- over prompts: a stratified bootstrap that resamples the prompts within each seed (with replacement)
  and recomputes the mean over seeds; the interval is the 2.5–97.5 % percentile range.

An outcome is a list of per-prompt values (0/1 verdicts or pixel changes); a figure is their mean.
"""
from __future__ import annotations

import math

import numpy as np

# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(dof: int) -> float:
    return _T975[dof - 1] if 1 <= dof <= len(_T975) else 1.96


def seed_interval(values) -> tuple[float, float, float] | None:
    """(mean, low, high) over per-seed values; low = high = mean for one seed; None when there are none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return None
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


def bootstrap_interval(per_seed_outcomes, reps: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95 % percentile interval of the mean over seeds of each seed's mean outcome, resampling prompts within
    each seed. `per_seed_outcomes`: one sequence of per-prompt values per seed (empty ones are skipped)."""
    groups = [np.asarray(g, dtype=float) for g in per_seed_outcomes if g is not None and len(g)]
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    means = np.zeros(reps)
    for g in groups:
        idx = rng.integers(0, len(g), size=(reps, len(g)))
        means += g[idx].mean(1)
    means /= len(groups)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def summary(per_seed_outcomes, digits: int = 4) -> dict:
    """{"mean", "seeds95": [lo, hi], "bootstrap95": [lo, hi], "per_seed": [...]} for one figure."""
    per_seed = [float(np.mean(g)) if g is not None and len(g) else None for g in per_seed_outcomes]
    si = seed_interval(per_seed)
    bi = bootstrap_interval(per_seed_outcomes)
    r = lambda x: None if x is None else round(x, digits)  # noqa: E731
    return {"mean": r(si[0]) if si else None,
            "seeds95": [r(si[1]), r(si[2])] if si else None,
            "bootstrap95": [r(bi[0]), r(bi[1])] if bi else None,
            "per_seed": [r(x) for x in per_seed]}
