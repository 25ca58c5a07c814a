"""The scores routing gives a position from pooled activations, before any SAE is trained: transfer (leave-one-
category-out AUROC of a harmful direction), stability (agreement of directions across step bins and
categories) and separability (cross-validated AUROC); and the AUROC they are built on."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .config import RoutingConfig, RoutingError


def _vec(a) -> torch.Tensor:
    return (a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a, dtype=np.float64))).double().flatten()


def auroc(pos: torch.Tensor | np.ndarray | Sequence[float], neg: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie): the Mann–Whitney statistic with mid-ranks."""
    pos, neg = _vec(pos), _vec(neg)
    n1, n0 = pos.numel(), neg.numel()
    if n1 == 0 or n0 == 0:
        raise RoutingError(f"AUROC needs positives and negatives (got {n1} and {n0})")
    s = torch.cat([pos, neg])
    if not torch.isfinite(s).all():
        raise RoutingError("AUROC: scores contain NaN or inf")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    before = torch.cumsum(counts, 0) - counts  # elements strictly smaller
    midrank = before.double() + (counts.double() + 1.0) / 2.0  # 1-based mid-ranks of each distinct value
    rank_pos = midrank[inverse[:n1]].sum().item()
    return float((rank_pos - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def stratified_auroc(pos, neg, pos_strata, neg_strata) -> float:
    """AUROC over the (positive, negative) pairs of the same stratum only: the mean of the per-stratum
    AUROCs weighted by their pair counts. Strata present on one side only contribute no pairs."""
    pos, neg = _vec(pos), _vec(neg)
    sp, sn = torch.as_tensor(pos_strata).flatten(), torch.as_tensor(neg_strata).flatten()
    total = pairs = 0.0
    for v in torch.unique(sp).tolist():
        a, b = pos[sp == v], neg[sn == v]
        if a.numel() and b.numel():
            w = a.numel() * b.numel()
            total += w * auroc(a, b)
            pairs += w
    if pairs == 0:
        raise RoutingError("stratified AUROC: no stratum has both positives and negatives")
    return total / pairs


def _folds(strata: Sequence[Sequence[int]], k: int, gen: torch.Generator) -> list[list[int]]:
    """`k` folds: each stratum is shuffled, then all are dealt round-robin with one running counter, so
    every fold gets its share of each stratum and of the strata taken together."""
    folds: list[list[int]] = [[] for _ in range(k)]
    j = int(torch.randint(k, (1,), generator=gen))
    for items in strata:
        items = list(items)
        for i in torch.randperm(len(items), generator=gen).tolist():
            folds[j % k].append(items[i])
            j += 1
    return folds


def _direction(x: torch.Tensor, y: torch.Tensor, step: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """Harmful direction from rows `x` [n, d] with unsafe mask `y` [n] (and their steps)."""
    v = x[y].mean(0) - x[~y].mean(0)
    if cfg.probe == "diffmean":
        return v
    # within-class residuals; with within_step also within-step, so the step shift is not "noise" to whiten
    key = y.long() * (int(step.max()) + 1) + step if cfg.within_step else y.long()
    _, inv = torch.unique(key, return_inverse=True)
    means = torch.zeros(int(inv.max()) + 1, x.shape[1], dtype=x.dtype).index_add_(0, inv, x)
    means /= torch.bincount(inv).to(x.dtype)[:, None]
    xc = x - means[inv]
    n, d = xc.shape
    alpha = cfg.ridge * float((xc * xc).sum()) / (n * d) + 1e-12
    if n >= d:
        cov = xc.T @ xc / n
        return torch.linalg.solve(cov + alpha * torch.eye(d, dtype=x.dtype), v)
    # Woodbury: (αI + XᵀX/n)⁻¹ v = (v − Xᵀ (nαI + XXᵀ)⁻¹ X v) / α
    g = xc @ xc.T + n * alpha * torch.eye(n, dtype=x.dtype)
    return (v - xc.T @ torch.linalg.solve(g, xc @ v)) / alpha


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def score_position(x: torch.Tensor, prompt: torch.Tensor, step: torch.Tensor, unsafe: dict[int, bool],
                   category: dict[int, str], cfg: RoutingConfig, bins: list[list[int]] | None = None) -> dict:
    """T, T_min, per-category T, S, S_step, S_category and A for one position's source rows.

    `unsafe` / `category` map the prompt indices of the rows to their label and (unsafe) category.
    """
    x = x.double()
    prompt = prompt.long()
    step = step.long()
    gen = torch.Generator().manual_seed(cfg.seed)
    y = torch.tensor([unsafe[int(i)] for i in prompt], dtype=torch.bool)
    pids = sorted(set(prompt.tolist()))
    safe_ids = [i for i in pids if not unsafe[i]]
    cats: dict[str, list[int]] = {}
    for i in pids:
        if unsafe[i]:
            cats.setdefault(category[i], []).append(i)
    if len(safe_ids) < 2 or sum(map(len, cats.values())) < 2:
        raise RoutingError(f"needs at least 2 safe and 2 unsafe source prompts with rows "
                           f"(has {len(safe_ids)} safe, {sum(map(len, cats.values()))} unsafe)")

    def rows_of(ids: Iterable[int]) -> torch.Tensor:
        return torch.isin(prompt, torch.tensor(sorted(ids), dtype=torch.long))

    def fit_score(train_ids, test_pos_ids, test_neg_ids) -> float:
        tr = rows_of(train_ids)
        s = x @ _direction(x[tr], y[tr], step[tr], cfg)
        rp, rn = rows_of(test_pos_ids), rows_of(test_neg_ids)
        if cfg.within_step:
            return stratified_auroc(s[rp], s[rn], step[rp], step[rn])
        return auroc(s[rp], s[rn])

    # A: stratified K-fold over prompts
    n_unsafe = sum(map(len, cats.values()))
    k = min(cfg.cv_folds, len(safe_ids), n_unsafe)
    a_vals = []
    for f in _folds([safe_ids, *cats.values()], k, gen):
        test = set(f)
        tpos = [i for i in f if unsafe[i]]
        tneg = [i for i in f if not unsafe[i]]
        train = [i for i in pids if i not in test]
        if tpos and tneg and any(unsafe[i] for i in train) and any(not unsafe[i] for i in train):
            a_vals.append(fit_score(train, tpos, tneg))
    if not a_vals:
        raise RoutingError("too few prompts for cross-validated separability (no fold has both labels)")
    A = float(np.mean(a_vals))

    # T: leave one category out, safe prompts in folds
    by_cat: dict[str, float] = {}
    if len(cats) >= 2:
        ks = min(cfg.cv_folds, len(safe_ids))
        safe_folds = _folds([safe_ids], ks, gen)
        for c, members in cats.items():
            others = [i for cc, m in cats.items() if cc != c for i in m]
            vals = []
            for f in safe_folds:
                fs = set(f)
                vals.append(fit_score(others + [i for i in safe_ids if i not in fs], members, f))
            by_cat[c] = float(np.mean(vals))
        T, T_min = float(np.mean(list(by_cat.values()))), float(min(by_cat.values()))
    else:
        T, T_min = A, float(min(a_vals))

    # S: attenuation-corrected agreement across step bins and across categories
    if bins is None:
        bins = step_bins(step.tolist(), cfg.step_bins)
    halves_strata = [safe_ids, *cats.values()]
    splits = []
    for _ in range(cfg.stability_splits):
        h = _folds(halves_strata, 2, gen)
        splits.append((set(h[0]), set(h[1])))

    def bin_dirs(half: set[int]) -> list[torch.Tensor | None]:
        out = []
        inhalf = rows_of(half)
        for b in bins:
            r = inhalf & torch.isin(step, torch.tensor(b, dtype=torch.long))
            out.append(x[r & y].mean(0) - x[r & ~y].mean(0) if (r & y).any() and (r & ~y).any() else None)
        return out

    def cat_dirs(half: set[int]) -> list[torch.Tensor | None]:
        safe_rows = rows_of([i for i in safe_ids if i in half])
        mu0 = x[safe_rows].mean(0) if safe_rows.any() else None
        out = []
        for members in cats.values():
            r = rows_of([i for i in members if i in half])
            out.append(x[r].mean(0) - mu0 if r.any() and mu0 is not None else None)
        return out

    S_step = _agreement(bin_dirs, splits, cfg.reliability_floor) if len(bins) >= 2 else None
    S_cat = _agreement(cat_dirs, splits, cfg.reliability_floor) if len(cats) >= 2 else None
    parts = [v for v in (S_step, S_cat) if v is not None]
    S = float(np.mean(parts)) if parts else None
    return {"T": T, "T_min": T_min, "transfer_by_category": by_cat, "S": S, "S_step": S_step,
            "S_category": S_cat, "A": A, "step_bins": bins}


def step_bins(steps: Iterable[int], n_bins: int) -> list[list[int]]:
    """Contiguous bins of the distinct recorded steps, as equal in size as possible."""
    uniq = sorted({int(s) for s in steps})
    n = min(n_bins, len(uniq))
    return [a.tolist() for a in np.array_split(np.array(uniq, dtype=np.int64), n)] if n else []


def _agreement(dirs_fn, splits, floor: float) -> float | None:
    """max(0, mean over pairs a<b of the attenuation-corrected cosine) of the directions `dirs_fn` gives."""
    cross_sum = rel_sum = None
    cross_n = rel_n = None
    for h1, h2 in splits:
        d1, d2 = dirs_fn(h1), dirs_fn(h2)
        k = len(d1)
        ok = torch.tensor([a is not None and b is not None for a, b in zip(d1, d2)])
        if ok.sum() < 2:
            continue
        width = next(a for a in d1 if a is not None).numel()
        z = torch.zeros(width, dtype=torch.float64)
        u1 = _unit(torch.stack([a if a is not None else z for a in d1]))
        u2 = _unit(torch.stack([b if b is not None else z for b in d2]))
        c = u1 @ u2.T
        pair = (ok[:, None] & ok[None, :]).double()
        if cross_sum is None:
            cross_sum, rel_sum = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
            cross_n, rel_n = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        cross_sum += (c + c.T) / 2 * pair
        cross_n += pair
        rel_sum += torch.diagonal(c) * ok.double()
        rel_n += ok.double()
    if cross_sum is None:
        return None
    rel = (rel_sum / rel_n.clamp_min(1)).clamp_min(floor)
    rho = (cross_sum / cross_n.clamp_min(1)) / torch.sqrt(rel[:, None] * rel[None, :])
    iu = torch.triu_indices(len(rel), len(rel), 1)
    valid = cross_n[iu[0], iu[1]] > 0
    if not valid.any():
        return None
    mean = float(rho.clamp(-1, 1)[iu[0], iu[1]][valid].mean())
    return max(0.0, mean)
