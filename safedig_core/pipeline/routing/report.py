"""The routing report: every position's scores, the selection and its reasons, as JSON (`routing.json`) and a
picture (`routing.png`)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from ...formats.atomic import write_text
from .figure import plot_report


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
        return sorted(self.scores, key=rank_key)

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


def rank_key(s: PositionScore):
    return (-s.R, -s.A, s.name)
