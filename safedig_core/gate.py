"""The per-image gate across positions: which positions detect, and how one model call's decision reaches
the blocks that act on it. Shared by every adapter (ComfyUI block patches, diffusers hooks).

Under `SteeringConfig.gate == "image"` an image of the batch is flagged when the max of the harmful mass over
the tokens of its cond rows exceeds τ × the position's image unit (`PositionSteerer.flag_images`); all its
rows follow, the uncond ones included (they hold the negative prompt, which the image is pushed away from:
an empty negative prompt must not open the gate of every image, and a risky word in it must not either).
With `detect="each"` every position decides for itself from its own tokens. Otherwise the
detecting positions decide and every acting position of the same model call steers the rows they flagged:

- blocks run in `Position.call_order` (FLUX: double blocks, then single blocks; SD3: joint blocks);
- a block's detectors read its output before any of its positions is steered;
- an acting position uses the union of the decisions made so far in this call (several detectors: a row
  is flagged once any of them flags it). A block position that runs before every detector would never see a
  decision, so `plan` rejects it with a message saying so, rather than silently never steering it;
- the DiT's inputs (`input.txt`, `input.pooled`) run before every block, so they take the decision of the
  previous model call of the same sampling run (`CarriedDecision`: the prompt does not change between
  steps); in a run's first call, or when the batch's layout changed, they decide for themselves;
- each model call decides afresh: the first detector in call order clears what an earlier call left;
- a position with safe exemplars (`PositionSteerer.targets`) steers cond rows only: the uncond row holds the
  negative prompt's vector, and moving it toward a safe scene would push the guided image away from that scene.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .positions import INPUT_KINDS, Position, parse_list
from .schedule import chunk_size, half_rows
from .steering import PositionSteerer, SteeringConfig

STREAM_OF = {"text": "txt", "img": "img"}


@dataclass(frozen=True)
class GatePlan:
    """Acting positions, and the detecting ones (empty: each position decides for itself, or the per-token
    gate), in call order."""
    acting: tuple[Position, ...]
    detectors: tuple[Position, ...] = ()
    own: tuple[Position, ...] = ()  # acting inputs that run before every detector: each decides for itself

    @property
    def shared(self) -> bool:
        return bool(self.detectors)

    @property
    def positions(self) -> list[Position]:
        """Every position a runtime must see: acting and detecting."""
        return sorted(set(self.acting) | set(self.detectors))


def plan(cfg: SteeringConfig, acting: list[Position], available: list[Position]) -> GatePlan:
    """Resolve `cfg.detect` against the steered positions (`acting`) and the dictionary's (`available`)."""
    acting = tuple(acting)
    spec = cfg.detect.strip().lower()
    if not cfg.image_gate or spec == "each":
        return GatePlan(acting)
    if spec in STREAM_OF:
        # the steered block positions of that stream; the DiT's inputs run before every block and decide for
        # themselves unless no block position of the stream is steered
        of_stream = [p for p in acting if p.stream == STREAM_OF[spec]]
        found = [p for p in of_stream if p.kind not in INPUT_KINDS] or of_stream
        if not found:
            names = ", ".join(map(str, acting)) or "none"
            raise ValueError(f"detect={cfg.detect!r}: none of the steered positions ({names}) is a {spec} position; "
                             f"steer at one (or name it in detect), or let each position decide for itself")
    else:
        found = parse_list(cfg.detect, available)
    found = sorted(found, key=lambda p: (p.call_order, p.stream))
    first = found[0].call_order
    early = [p for p in acting if p.call_order < first and p.kind not in INPUT_KINDS]
    if early:
        raise ValueError(f"position {early[0]} runs before every detecting position ({', '.join(map(str, found))}) "
                         "in a model call, so it would never see a decision: detect at an earlier position, or "
                         "leave it out of the steered positions")
    return GatePlan(acting, tuple(found), tuple(p for p in acting if p.call_order < first))


class CallDecision:
    """The rows flagged in one model call, per detecting position."""

    def __init__(self):
        self.flags: dict[Position, Tensor] = {}

    def add(self, p: Position, flags: Tensor) -> None:
        self.flags[p] = flags

    def rows(self) -> Tensor | None:
        """Union of the decisions so far ([B] bool), None before any detector has run."""
        out = None
        for f in self.flags.values():
            out = f if out is None else out | f
        return out


class CarriedDecision:
    """The rows the detectors flagged in the latest model call of a sampling run, per cond/uncond chunk code, for
    the positions that run before every detector (`GatePlan.own`) in the run's later calls. ComfyUI may run a
    step's cond and uncond chunks in one call or in several, so each chunk is kept under its code."""

    def __init__(self):
        self.chunks: dict = {}

    def clear(self) -> None:
        self.chunks = {}

    def keep(self, rows: Tensor | None, cond_or_uncond: list | None) -> None:
        if rows is None:
            return
        if not cond_or_uncond:
            self.chunks = {None: rows}
            return
        if len(set(cond_or_uncond)) != len(cond_or_uncond):  # several chunks of one kind: which is which is unknown
            self.clear()
            return
        per = chunk_size(rows.shape[0], cond_or_uncond)
        self.chunks.pop(None, None)
        self.chunks.update({c: rows[j * per:(j + 1) * per] for j, c in enumerate(cond_or_uncond)})

    def rows_for(self, batch: int, cond_or_uncond: list | None) -> Tensor | None:
        """The kept decision laid out as a call of `batch` rows and these chunk codes; None when it does not fit."""
        codes = list(cond_or_uncond) if cond_or_uncond else [None]
        if batch % len(codes) or len(set(codes)) != len(codes):
            return None
        per = batch // len(codes)
        parts = [self.chunks.get(c) for c in codes]
        if any(f is None or f.shape[0] != per for f in parts):
            return None
        return torch.cat(parts)


def steer_block(parts: dict[Position, Tensor], steerers: dict[Position, PositionSteerer], cfg: SteeringConfig,
                gate: GatePlan, call: CallDecision | None, rows_of: Callable[[Tensor], Tensor | None],
                cond_or_uncond: list | None = None, carried: Tensor | None = None) -> dict[Position, Tensor]:
    """Steer the streams of one block. `parts`: the block's token streams [B, T, d] by position (acting and
    detecting ones); `call`: this model call's decision (needed when `gate.shared`); `rows_of(x)`: the batch
    rows that apply_to allows (None: all); `cond_or_uncond`: the call's chunk codes (0 cond, 1 uncond; None:
    unknown, each row is its own image); `carried`: the previous call's decision for `gate.own` positions
    (`CarriedDecision.rows_for`; None: they decide for themselves). Returns the acting positions' tensors (the
    same object where nothing changed)."""
    flagged = None
    if gate.shared:
        for p in gate.detectors:
            if p in parts:
                if p == gate.detectors[0]:
                    call.flags.clear()
                call.add(p, steerers[p].flag_images(parts[p], cfg, cond_or_uncond))
        flagged = call.rows()
    out = {}
    for p, x in parts.items():
        if p not in gate.acting:
            continue
        rows = rows_of(x)
        if getattr(steerers[p], "targets", None) is not None and cond_or_uncond:
            cond = half_rows(x.shape[0], cond_or_uncond, "cond").to(x.device)
            rows = cond if rows is None else rows.to(x.device) & cond
        if p in gate.own and cfg.image_gate and carried is not None and carried.shape[0] == x.shape[0]:
            out[p] = steerers[p].steer(x, cfg, rows, flagged=carried.to(x.device))
        elif not gate.shared or p in gate.own:
            if cfg.image_gate:
                out[p] = steerers[p].steer(x, cfg, rows, flagged=steerers[p].flag_images(x, cfg, cond_or_uncond))
            else:
                out[p] = steerers[p].steer(x, cfg, rows)
        elif flagged is None or not bool(flagged.any()):
            out[p] = x
        elif flagged.shape[0] != x.shape[0]:
            raise ValueError(f"position {p}: a batch of {x.shape[0]} rows, but the detecting positions of this "
                             f"model call decided for {flagged.shape[0]}")
        else:
            out[p] = steerers[p].steer(x, cfg, rows, flagged=flagged)
    return out
