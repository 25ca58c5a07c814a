"""Routing's settings and its error type."""
from __future__ import annotations

import math
from dataclasses import dataclass


class RoutingError(ValueError):
    """Routing cannot run on this data; the message says why and what to change."""


@dataclass
class RoutingConfig:
    w_transfer: float = 0.5
    w_stability: float = 0.25
    w_separability: float = 0.25
    transfer_stat: str = "mean"  # "mean" or "min": which LOCO statistic enters R_p and the usefulness test
    probe: str = "diffmean"  # "diffmean" or "ridge"
    ridge: float = 1.0  # ridge strength, relative to the mean within-class variance
    within_step: bool = True  # AUROCs compare unsafe and safe rows of the same recorded step only
    cv_folds: int = 5
    step_bins: int = 3
    stability_splits: int = 4
    reliability_floor: float = 0.5
    min_gap: int = 2
    group_cap: int | None = None  # None: ceil(K / 2)
    useful_auroc: float = 0.6
    fallback: str = "split"  # fewer than 2 source categories: "split" or "raise"
    seed: int = 0

    def check(self) -> None:
        ws = (self.w_transfer, self.w_stability, self.w_separability)
        if any(not math.isfinite(w) or w < 0 for w in ws) or sum(ws) <= 0:
            raise RoutingError(f"routing weights must be >= 0 and not all 0 (got T={ws[0]}, S={ws[1]}, A={ws[2]})")
        if self.transfer_stat not in ("mean", "min"):
            raise RoutingError(f"transfer_stat must be 'mean' or 'min', not {self.transfer_stat!r}")
        if self.probe not in ("diffmean", "ridge"):
            raise RoutingError(f"probe must be 'diffmean' or 'ridge', not {self.probe!r}")
        if self.fallback not in ("split", "raise"):
            raise RoutingError(f"fallback must be 'split' or 'raise', not {self.fallback!r}")
        if self.cv_folds < 2 or self.step_bins < 1 or self.stability_splits < 1 or self.min_gap < 0:
            raise RoutingError("cv_folds >= 2, step_bins >= 1, stability_splits >= 1 and min_gap >= 0 are required")
