"""`route`: score every position of a store on its source prompts and select the ones to train."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any, Protocol

import torch

from ...positions import FAMILIES, ModelLayout, Position, PositionError, block_number, depth, group, parse, parse_list
from .config import RoutingConfig, RoutingError
from .report import PositionScore, RoutingReport
from .scores import score_position, step_bins
from .select import select_positions


class PooledLike(Protocol):
    x: torch.Tensor  # float [m, d]
    prompt: torch.Tensor  # int [m], indices into store.prompts
    step: torch.Tensor  # int [m], sampler step index


class StoreLike(Protocol):
    family: str
    positions: Sequence[Position]
    prompts: Sequence[Any]

    def pooled(self, p: Position, prompts: Sequence[int] | None = None) -> PooledLike: ...


def infer_layout(family: str, positions: Iterable[Position]) -> ModelLayout:
    """Block counts from the collected positions (the highest index seen + 1 per block kind)."""
    positions = list(positions)
    blocks = {kind: 0 for kind in FAMILIES[family]}
    for p in positions:
        blocks[p.kind] = max(blocks.get(p.kind, 0), p.index + 1)
    last_txt_absent = family == "sd3" and blocks.get("joint", 0) > 0 and not any(
        p.kind == "joint" and p.stream == "txt" and p.index == blocks["joint"] - 1 for p in positions)
    return ModelLayout(family, blocks, width=0, last_txt_absent=last_txt_absent)


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
    try:
        chosen = available if positions is None else parse_list(list(positions), available, "the store")
    except PositionError as e:
        raise RoutingError(str(e).replace(" was asked for but", "")) from None
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
            block=block_number(p, layout), R=float(R), T=r["T"], T_min=r["T_min"], S=r["S"], S_step=r["S_step"],
            S_category=r["S_category"], A=r["A"], transfer_by_category=r["transfer_by_category"],
            useful=bool(t_stat >= cfg.useful_auroc), rows=int(x.shape[0]), prompts=len(set(pr.tolist()))))
    if bins_seen is not None and len(bins_seen) < 2:
        notes.append("only one recorded sampler step: step stability is undefined and S uses categories only")
    if all(s.S is None for s in results):
        notes.append("stability undefined for every position (one step and one category): R uses T and A only")

    selected, picks, sel_notes = select_positions(results, k, cfg.min_gap, cfg.group_cap)
    notes += sel_notes
    if len(results) < k:
        notes.append(f"asked for {k} positions but only {len(results)} were scored")
    best = min(results, key=lambda s: (-s.A, -s.R, s.name))
    return RoutingReport(family=family, k=k, config=asdict(cfg), transfer_mode=mode, categories=cats,
                         safe_prompts=n_safe, step_bins=bins_seen or [], scores=results, selected=selected,
                         selection=picks, best_fixed=best.name, notes=notes)
