"""Choosing K positions from their scores: greedy by R, under the diversity rule (functional groups, block gaps),
each relaxation of the rule recorded."""
from __future__ import annotations

import math
from collections.abc import Sequence

from .config import RoutingError
from .report import PositionScore, rank_key


def select_positions(scores: Sequence[PositionScore], k: int, min_gap: int = 2, group_cap: int | None = None
           ) -> tuple[list[str], list[dict], list[str]]:
    """The diversity rule of the module docstring. Returns (names in order, per-pick records, notes)."""
    if k < 1:
        raise RoutingError(f"--top must be at least 1 (got {k})")
    cap = group_cap if group_cap is not None else math.ceil(k / 2)
    order = sorted(scores, key=rank_key)
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
