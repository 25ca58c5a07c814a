"""Robustness-aware pre-training routing (METHOD.md §3): which positions deserve an SAE.

Runs on the per-prompt pooled activations of a collected store, **source domain only** (routing
happens before the target domain is seen: target prompts are never read). Per candidate position `p`:

- **Transfer `T_p`** — leave-one-category-out (LOCO) over the source unsafe categories. For each held-out
  category `c` a harmful direction is fitted on the other categories vs safe and scored by AUROC on `c`
  vs safe. The safe prompts are split in `cv_folds` folds so that the safe prompts a direction is scored
  on were never used to fit it (`T_c` = mean over the folds). `T_p` = mean of `T_c` over the held-out
  categories, `T_min` = their minimum (the worst unseen risk); both are reported, `transfer_stat`
  picks which one enters the score.
- **Stability `S_p`** — agreement of harmful directions (difference of means) across sampler-step bins
  (`step_bins` contiguous bins of the recorded steps, e.g. early/mid/late) and across categories (each
  category vs safe), as the mean pairwise cosine. Raw cosines of estimated directions shrink towards 0
  with sampling noise (in width 3072 a weak but perfectly stable direction would look unstable), so
  each cosine is *attenuation-corrected*: prompts are split in random halves, the cosine between
  direction `a` of one half and `b` of the other is divided by `sqrt(r_a r_b)`, where `r_a` is the
  split-half cosine of `a` with itself (its reliability), floored at `reliability_floor` so that pure
  noise is not blown up. Negative agreement (a direction that flips) is as useless to one gate as none,
  so each part is `max(0, mean cosine)` in [0, 1]; `S_p` = mean of the parts that are defined (the step
  part needs at least 2 recorded steps, the category part at least 2 categories).
- **Separability `A_p`** — in-domain AUROC of safe vs unsafe (all source categories), cross-validated
  with `cv_folds` folds stratified by label and category; the folds are over prompts, so the rows of
  one prompt at different steps never sit on both sides.
- **Score** `R_p = (w_T T_p + w_S S_p + w_A A_p) / (w_T + w_S + w_A)` over the defined components;
  defaults `w_T = 0.5, w_S = 0.25, w_A = 0.25`: transfer is what the method is about, and separability
  alone is exactly the "fixed layer" trap (a position can separate the known risks through
  category-specific features that say nothing about a new risk).

Rows are the pooled vectors of one prompt at one recorded step; directions are fitted on rows (one
direction for all steps, as one gate uses), and folds are over prompts. AUROCs compare unsafe and safe
rows *of the same recorded step* (`within_step=True`, the pair-weighted mean of per-step AUROCs): the
activations of a DiT shift with the timestep (adaLN modulation), and that shift, common to safe and
unsafe, is a nuisance that would otherwise swamp the harmful signal in a pooled ranking;
`within_step=False` pools all rows (one threshold for all steps). The harmful direction is the
difference of means (`probe="diffmean"`, default) or a ridge (shrinkage-LDA) probe
`(Σ_w + λ tr(Σ_w)/d I)⁻¹ (μ₁ − μ₀)` (`probe="ridge"`; Σ_w from within-class, within-step residuals;
solved in the dual when rows < width, O(n² d) per fit).

**Fewer than 2 source categories** (LOCO impossible): with `fallback="split"` (default) `T_p` falls back
to the cross-validated AUROC over held-out *prompts* of the one category (so it equals `A_p` and cannot
tell transfer from fit); the report says so in `transfer_mode = "within-category split"` and in its
notes. `fallback="raise"` refuses instead. Unsafe prompts without a category count as one category
named `(none)`.

**Route: top-K with a diversity rule.** Candidates are taken greedily in order of `R_p` (ties: higher
`A_p`, then name). A candidate is *useful* when its transfer statistic is at least `useful_auroc`
(default 0.6). Constraints:
  1. *gap*: two selected positions of the same stream (img / txt) are more than `min_gap` blocks apart
     (default 2: block distance 1 or 2 is refused). Blocks are numbered along the whole stack, so FLUX's
     last double block and first single block are neighbours;
  2. *group cap*: at most `ceil(K/2)` positions (or `group_cap`) from one functional group
     (`positions.group`: text binding / visual binding / rendering).
Passes, each filling what the previous one left: (1) useful candidates under both constraints; (2)
useful candidates under the gap rule only — the cap is lifted only because no other group has a useful
candidate left; (3) any candidate under the gap rule (fewer than K useful positions exist); (4) any
candidate (the stack is too small for the gap). Every selection records its pass, and each relaxation
adds a note to the report.

`best_fixed` is the single position with the highest `A_p` (ties: higher `R_p`, then name): the "fixed
layer" baseline for the ablation of METHOD §7.

The store is used only through a small interface (duck typing, see `StoreLike`): `.family`,
`.positions`, `.prompts` (records with `label`, `category`, `domain`, `id`) and `.pooled(p, prompts)`
returning `x [m, d]`, `prompt [m]`, `step [m]`; optionally `.layout` (a `ModelLayout`). Without a layout
the block counts are inferred from the collected positions, and depth is relative to them.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch

from ..formats.atomic import replacing, write_text
from ..positions import FAMILIES, ModelLayout, Position, depth, group, parse

__all__ = [
    "PositionScore",
    "RoutingConfig",
    "RoutingError",
    "RoutingReport",
    "StoreLike",
    "auroc",
    "infer_layout",
    "plot_report",
    "route",
    "score_position",
    "select",
    "step_bins",
    "stratified_auroc",
]


class RoutingError(ValueError):
    """Routing cannot run on this data; the message says why and what to change."""


class PooledLike(Protocol):
    x: torch.Tensor  # float [m, d]
    prompt: torch.Tensor  # int [m], indices into store.prompts
    step: torch.Tensor  # int [m], sampler step index


class StoreLike(Protocol):
    family: str
    positions: Sequence[Position]
    prompts: Sequence[Any]

    def pooled(self, p: Position, prompts: Sequence[int] | None = None) -> PooledLike: ...


# ---------------------------------------------------------------------------------------------- AUROC

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


# --------------------------------------------------------------------------------------------- config

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


# --------------------------------------------------------------------------------------------- report

@dataclass
class PositionScore:
    name: str
    stream: str
    group: str
    depth: float
    block: int  # block number along the whole stack (FLUX single blocks follow the double ones)
    R: float
    T: float  # mean LOCO AUROC over held-out categories
    T_min: float
    S: float | None  # None when neither stability part is defined
    S_step: float | None
    S_category: float | None
    A: float
    transfer_by_category: dict[str, float]
    useful: bool
    rows: int
    prompts: int


@dataclass
class RoutingReport:
    family: str
    k: int
    config: dict
    transfer_mode: str  # "leave-one-category-out" or "within-category split"
    categories: dict[str, int]  # source unsafe category -> prompts
    safe_prompts: int
    step_bins: list[list[int]]
    scores: list[PositionScore]  # in store order
    selected: list[str]  # in selection order
    selection: list[dict]  # {"name", "group", "pass", "why"}
    best_fixed: str
    notes: list[str] = field(default_factory=list)

    def score(self, name: str) -> PositionScore:
        for s in self.scores:
            if s.name == name:
                return s
        raise KeyError(name)

    def ranking(self) -> list[PositionScore]:
        return sorted(self.scores, key=_rank_key)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> RoutingReport:
        d = dict(d)
        d["scores"] = [PositionScore(**s) for s in d["scores"]]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> RoutingReport:
        return cls.from_dict(json.loads(text))

    def save(self, out_dir: str) -> tuple[str, str]:
        """Write `routing.json` and `routing.png` into `out_dir` (each atomically); return their paths."""
        js, png = os.path.join(out_dir, "routing.json"), os.path.join(out_dir, "routing.png")
        write_text(js, self.to_json())
        plot_report(self, png)
        return js, png

    def summary(self) -> str:
        head = (f"routing ({self.transfer_mode}; {len(self.categories)} source categories, "
                f"{self.safe_prompts} safe prompts): selected {', '.join(self.selected) or 'nothing'}; "
                f"best fixed (by A): {self.best_fixed}")
        lines = [head]
        lines += [f"  {s.name:<18} R={s.R:.3f} T={s.T:.3f} (min {s.T_min:.3f}) S={_fmt(s.S)} A={s.A:.3f}"
                  f"{'  <- selected' if s.name in self.selected else ''}" for s in self.ranking()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _rank_key(s: PositionScore):
    return (-s.R, -s.A, s.name)


# ------------------------------------------------------------------------------------------- helpers

def infer_layout(family: str, positions: Iterable[Position]) -> ModelLayout:
    """Block counts from the collected positions (the highest index seen + 1 per block kind)."""
    positions = list(positions)
    blocks = {kind: 0 for kind in FAMILIES[family]}
    for p in positions:
        blocks[p.kind] = max(blocks.get(p.kind, 0), p.index + 1)
    last_txt_absent = family == "sd3" and blocks.get("joint", 0) > 0 and not any(
        p.kind == "joint" and p.stream == "txt" and p.index == blocks["joint"] - 1 for p in positions)
    return ModelLayout(family, blocks, width=0, last_txt_absent=last_txt_absent)


def _block(p: Position, layout: ModelLayout) -> int:
    order = FAMILIES[layout.family]
    return sum(layout.blocks.get(k, 0) for k in order[: order.index(p.kind)]) + p.index


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


# --------------------------------------------------------------------------------------- per position

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


# ---------------------------------------------------------------------------------------- selection

def select(scores: Sequence[PositionScore], k: int, min_gap: int = 2, group_cap: int | None = None
           ) -> tuple[list[str], list[dict], list[str]]:
    """The diversity rule of the module docstring. Returns (names in order, per-pick records, notes)."""
    if k < 1:
        raise RoutingError(f"--top must be at least 1 (got {k})")
    cap = group_cap if group_cap is not None else math.ceil(k / 2)
    order = sorted(scores, key=_rank_key)
    chosen: list[PositionScore] = []
    picks: list[dict] = []
    notes: list[str] = []

    def gap_ok(s: PositionScore) -> bool:
        return all(not (c.stream == s.stream and abs(c.block - s.block) <= min_gap) for c in chosen)

    def cap_ok(s: PositionScore) -> bool:
        return sum(c.group == s.group for c in chosen) < cap

    passes = [
        (1, "useful; group cap and gap", lambda s: s.useful and cap_ok(s) and gap_ok(s)),
        (2, "useful; group cap lifted (no other group has a useful candidate left)", lambda s: s.useful and gap_ok(s)),
        (3, "not useful (transfer below threshold); gap kept", gap_ok),
        (4, "gap lifted (too few positions)", lambda s: True),
    ]
    for number, why, admissible in passes:
        before = len(chosen)
        for s in order:
            if len(chosen) >= k:
                break
            if s not in chosen and admissible(s):
                chosen.append(s)
                picks.append({"name": s.name, "group": s.group, "pass": number, "why": why})
        if number > 1 and len(chosen) > before:
            added = ", ".join(p["name"] for p in picks[before:])
            notes.append(f"selection pass {number} ({why}): {added}")
    return [c.name for c in chosen], picks, notes


# -------------------------------------------------------------------------------------------- route

def route(store: StoreLike, k: int, config: RoutingConfig | None = None,
          positions: Sequence[str | Position] | None = None, layout: ModelLayout | None = None,
          progress=None) -> RoutingReport:
    """Score every position (or `positions`) of `store` on its source prompts and select `k` of them."""
    cfg = config or RoutingConfig()
    cfg.check()
    if k < 1:
        raise RoutingError(f"--top must be at least 1 (got {k})")
    family = store.family
    available = [p if isinstance(p, Position) else parse(p) for p in store.positions]
    if not available:
        raise RoutingError("the store has no positions")
    if positions is None:
        chosen = available
    else:
        chosen = []
        for p in positions:
            p = p if isinstance(p, Position) else parse(p)
            if p not in available:
                have = ", ".join(str(a) for a in available)
                raise RoutingError(f"position {p} is not in the store (it has: {have})")
            if p not in chosen:
                chosen.append(p)
    notes: list[str] = []
    if layout is None:
        layout = getattr(store, "layout", None)
    if layout is None:
        layout = infer_layout(family, available)
        notes.append("model layout inferred from the collected positions: depth and block gaps are "
                     "relative to the highest collected block of each kind")

    if getattr(store, "complete", True) is False:
        notes.append("the store is incomplete (collection did not finish): routed on the prompts collected so far")
    records = list(store.prompts)
    src = [i for i, r in enumerate(records) if str(r.domain).lower() == "source"]
    if not src:
        raise RoutingError(f"no source-domain prompts in the store ({len(records)} prompts, none with "
                           "domain=source): routing scores source prompts only")
    unsafe = {i: str(records[i].label).lower() == "unsafe" for i in src}
    category = {i: (str(records[i].category or "").strip() or "(none)") for i in src if unsafe[i]}
    n_unsafe, n_safe = sum(unsafe.values()), len(src) - sum(unsafe.values())
    if n_unsafe == 0:
        raise RoutingError(f"no unsafe source prompts: all {len(src)} source prompts are safe, so there is "
                           "no harmful signal to route on (label some source prompts 'unsafe')")
    if n_safe == 0:
        raise RoutingError(f"no safe source prompts: all {len(src)} source prompts are unsafe; routing "
                           "needs safe prompts to contrast with")
    cats: dict[str, int] = {}
    for c in category.values():
        cats[c] = cats.get(c, 0) + 1
    if "(none)" in cats:
        notes.append(f"{cats['(none)']} unsafe source prompts have no category; they count as one "
                     "category '(none)'")
    if len(cats) < 2:
        only = next(iter(cats))
        msg = (f"leave-one-category-out transfer needs at least 2 source unsafe categories, the store has "
               f"one ({only!r})")
        if cfg.fallback == "raise":
            raise RoutingError(msg + "; add prompts of another category or use fallback='split'")
        notes.append(msg + ": T falls back to cross-validated AUROC over held-out prompts of that category "
                     "(T then equals A and does not measure transfer to a new risk)")
        mode = "within-category split"
    else:
        mode = "leave-one-category-out"

    src_set = torch.tensor(src, dtype=torch.long)
    results: list[PositionScore] = []
    bins_seen: list[list[int]] | None = None
    for n, p in enumerate(chosen):
        if progress is not None:
            progress(n, len(chosen), p)
        pooled = store.pooled(p, prompts=src)
        x = torch.as_tensor(pooled.x)
        pr, st = torch.as_tensor(pooled.prompt).long(), torch.as_tensor(pooled.step).long()
        keep = torch.isin(pr, src_set)  # never let a target row in, whatever the store returns
        x, pr, st = x[keep], pr[keep], st[keep]
        if x.shape[0] == 0:
            raise RoutingError(f"position {p}: the store has no pooled rows for the source prompts")
        bad = ~torch.isfinite(x).all(dim=1)
        if bad.any():
            ids = sorted(set(pr[bad].tolist()))
            named = ", ".join(str(getattr(records[i], "id", i)) for i in ids[:5])
            raise RoutingError(f"position {p}: NaN or inf activations in {int(bad.sum())} pooled rows "
                               f"(prompts {named}{', ...' if len(ids) > 5 else ''}); re-collect them")
        bins = step_bins(st.tolist(), cfg.step_bins)
        if bins_seen is None:
            bins_seen = bins
        elif bins != bins_seen:
            notes.append(f"position {p} has different recorded steps ({bins}) from the first position")
        try:
            r = score_position(x, pr, st, unsafe, category, cfg, bins)
        except RoutingError as e:
            raise RoutingError(f"position {p}: {e}") from None
        comps = [(cfg.w_transfer, r["T"] if cfg.transfer_stat == "mean" else r["T_min"]),
                 (cfg.w_stability, r["S"]), (cfg.w_separability, r["A"])]
        comps = [(w, v) for w, v in comps if v is not None]
        R = sum(w * v for w, v in comps) / max(sum(w for w, _ in comps), 1e-12)
        t_stat = r["T"] if cfg.transfer_stat == "mean" else r["T_min"]
        results.append(PositionScore(
            name=p.name, stream=p.stream, group=group(p, layout), depth=float(depth(p, layout)),
            block=_block(p, layout), R=float(R), T=r["T"], T_min=r["T_min"], S=r["S"], S_step=r["S_step"],
            S_category=r["S_category"], A=r["A"], transfer_by_category=r["transfer_by_category"],
            useful=bool(t_stat >= cfg.useful_auroc), rows=int(x.shape[0]), prompts=len(set(pr.tolist()))))
    if bins_seen is not None and len(bins_seen) < 2:
        notes.append("only one recorded sampler step: step stability is undefined and S uses categories only")
    if all(s.S is None for s in results):
        notes.append("stability undefined for every position (one step and one category): R uses T and A only")

    selected, picks, sel_notes = select(results, k, cfg.min_gap, cfg.group_cap)
    notes += sel_notes
    if len(results) < k:
        notes.append(f"asked for {k} positions but only {len(results)} were scored")
    best = min(results, key=lambda s: (-s.A, -s.R, s.name))
    return RoutingReport(family=family, k=k, config=asdict(cfg), transfer_mode=mode, categories=cats,
                         safe_prompts=n_safe, step_bins=bins_seen or [], scores=results, selected=selected,
                         selection=picks, best_fixed=best.name, notes=notes)


# --------------------------------------------------------------------------------------------- plot

_SERIES = (("R", "R routing score", "#111111", 2.6), ("T", "T transfer (LOCO AUROC)", "#1f77b4", 1.5),
           ("S", "S stability", "#2ca02c", 1.5), ("A", "A in-domain AUROC", "#ff7f0e", 1.5))
_MARKER = {"img": "o", "txt": "^"}
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}
_GROUP_SHADE = {"visual_binding": "#e8eef8", "rendering": "#f6ece4", "text_binding": "#eaf4ea"}


def plot_report(report: RoutingReport, path: str) -> str:
    """PNG of the scores per position: one panel per stream (img: circles, txt: triangles), relative depth on
    x, R/T/S/A as series, functional groups shaded, selected positions ringed and named with their rank,
    the best fixed position (max A) starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import (
        Figure,  # no pyplot: no global backend state, safe inside ComfyUI
    )
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    streams = [s for s in ("img", "txt") if any(p.stream == s for p in report.scores)]
    fig = Figure(figsize=(13, 3.5 * len(streams) + 1.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(streams), 1, sharex=True, squeeze=False)[:, 0]
    sel = {n: i + 1 for i, n in enumerate(report.selected)}
    half = 0.5 / max(len({round(p.depth, 9) for p in report.scores}) - 1, 1)  # half the spacing of positions
    for ax, stream in zip(axes, streams):
        pts = sorted((p for p in report.scores if p.stream == stream), key=lambda p: p.depth)
        # functional groups as background bands (contiguous runs along depth)
        runs: list[list[PositionScore]] = []
        for p in pts:
            if runs and runs[-1][-1].group == p.group:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            lo, hi = run[0].depth - half, run[-1].depth + half
            ax.axvspan(lo, hi, color=_GROUP_SHADE.get(run[0].group, "#eeeeee"), zorder=0, lw=0)
            ax.text((lo + hi) / 2, -0.085, run[0].group.replace("_", " "), ha="center", va="center", fontsize=8.5,
                    color="#555555", style="italic", zorder=1)
        xs = [p.depth for p in pts]
        for key, _, colour, lw in _SERIES:
            ys = [np.nan if getattr(p, key) is None else getattr(p, key) for p in pts]
            ax.plot(xs, ys, color=colour, lw=lw, marker=_MARKER[stream], ms=6.5 if key == "R" else 4.5,
                    zorder=4 if key == "R" else 3, alpha=1.0 if key == "R" else 0.8)
        ax.axhline(0.5, color="#888888", lw=0.9, ls=":", zorder=2)
        last_x, level = -1.0, 0
        for p in pts:
            ha = "left" if p.depth < 0.06 else ("right" if p.depth > 0.94 else "center")
            if p.name in sel:
                level = (level + 1) % 2 if p.depth - last_x < 0.18 else 0  # stagger labels of close neighbours
                last_x = p.depth
                ax.scatter([p.depth], [p.R], s=330, facecolors="none", edgecolors="#e0a800", lw=2.6, zorder=5)
                ax.annotate(f"#{sel[p.name]} {p.name}", (p.depth, p.R), xytext=(0, 13 + 15 * level),
                            textcoords="offset points", ha=ha, fontsize=9, fontweight="bold", color="#6b5000",
                            zorder=6, bbox=_LABEL_BOX)
            if p.name == report.best_fixed:
                ax.scatter([p.depth], [p.A], marker="*", s=300, color="#d62728", edgecolors="white", lw=0.8, zorder=6)
                ax.annotate(f"fixed: {p.name}", (p.depth, p.A), xytext=(0, -18), textcoords="offset points",
                            ha=ha, fontsize=8.5, color="#d62728", zorder=6,
                            bbox=_LABEL_BOX)
        ax.set_title(f"{stream} stream", fontsize=10.5, loc="left", fontweight="bold")
        ax.set_ylabel("score")
        ax.set_ylim(-0.13, 1.22)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(True, axis="y", alpha=0.3, zorder=1)
    axes[-1].set_xlabel("relative depth in the stack (0 = first block, 1 = last; FLUX single blocks follow the "
                        "double ones)")
    axes[-1].set_xlim(-0.03, 1.03)
    handles = [Line2D([], [], color=c, lw=lw, label=label) for _, label, c, lw in _SERIES]
    handles += [Line2D([], [], ls="", marker=_MARKER[s], color="#444444", label=f"{s} stream") for s in streams]
    handles += [Line2D([], [], ls="", marker="o", ms=13, mfc="none", mec="#e0a800", mew=2.4, label="selected (#rank)"),
                Line2D([], [], ls="", marker="*", ms=14, color="#d62728", label="best fixed (max A)"),
                Line2D([], [], ls=":", color="#888888", label="chance (AUROC 0.5)")]
    groups = sorted({p.group for p in report.scores})
    handles += [Patch(color=_GROUP_SHADE.get(g, "#eeeeee"), label=g.replace("_", " ")) for g in groups]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8.5, frameon=False)
    w = report.config
    total = w["w_transfer"] + w["w_stability"] + w["w_separability"]
    formula = f"{w['w_transfer']:g}·T + {w['w_stability']:g}·S + {w['w_separability']:g}·A"
    formula = formula if abs(total - 1) < 1e-9 else f"({formula}) / {total:g}"
    fig.suptitle(f"SafeDIG routing — {report.family.upper()}, top {report.k}: {', '.join(report.selected)}   "
                 f"(fixed-layer baseline: {report.best_fixed})\nR = {formula};  T: {report.transfer_mode} over "
                 f"{len(report.categories)} source categories, {report.safe_prompts} safe prompts", fontsize=10.5)
    legend_rows = math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 1))
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
