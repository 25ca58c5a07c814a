"""Collection: run a model over a prompt set and record chosen positions at chosen sampler steps into an
activation store (formats/store.py). The CLI (`safedig collect`) and the SafeDIG Collect Activations node both
call `collect()`; what differs is how they build the `Runner` (adapters/comfy/runner.py,
adapters/diffusers/runner.py) and report progress.

What is recorded, per prompt, per position, per recorded step (the cond half of the batch only, the
first model evaluation of that step):
- `token_budget` token rows, chosen uniformly without replacement by a generator seeded with
  (seed, prompt index, step) - so a resumed run picks the same tokens as an uninterrupted one, and
  positions whose streams have the same length see the same token indices; a stream shorter than the
  budget is stored whole; `token_budget = 0` stores no rows (pooled means only, e.g. to route over
  every position cheaply);
- the mean over all the stream's tokens (before subsampling), float32: the pooled activation routing uses.

Steps to record are sampler step indices 0 .. steps-1; a spec may give indices (`0, 5, -1`), fractions of
the schedule (`0.25, 0.5`: step floor(f·steps), 1.0 the last step) or `all`. A number with a decimal point
is a fraction. Step i is the step whose schedule fraction i/steps the steering window uses.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ..formats.prompts import PromptRecord
from ..formats.store import StoreWriter
from ..positions import ModelLayout, Position, PositionError, for_layout
from .distributed import SINGLE, Ranks

SHARD_TARGET_BYTES = 256 << 20  # default shard size: one position of one shard is what a reader holds
MAX_PROMPTS_PER_SHARD = 32  # an interruption loses at most the prompts of one unfinished shard


class CollectError(ValueError):
    """Bad collection settings or a runner that did not deliver what was asked."""


Sink = Callable[[Position, torch.Tensor, int], None]


class Runner(Protocol):
    """Generates one image per call and hands recorded activations to `sink`."""

    layout: ModelLayout

    def describe(self) -> dict:
        """JSON settings that determine the activations (model identity, sampler, cfg, size); they go into
        the store's config, so resuming with different ones is refused."""

    def run(self, record: PromptRecord, seed: int, steps: int, positions: list[Position],
            record_step: Callable[[int], bool], sink: Sink) -> None:
        """Sample `record.prompt` with noise seed `seed` over `steps` steps; for each position and each step
        with `record_step(step)` true, call `sink(position, x [B, T, d], step)` once, x being the cond half of
        the batch (B = 1: one image per prompt)."""


# --- settings ------------------------------------------------------------------------------------------

def parse_positions(spec, layout: ModelLayout) -> list[Position]:
    """The positions to record (`positions.for_layout`); at least one."""
    out = for_layout(spec, layout)
    if not out:
        raise PositionError("no positions to record")
    return out


def parse_record_steps(spec, steps: int) -> list[int]:
    """Sorted, distinct step indices in 0 .. steps-1 from `all`, a comma string or a list of ints/floats."""
    if steps < 1:
        raise CollectError(f"steps must be at least 1, got {steps}")
    if isinstance(spec, str):
        if spec.strip().lower() == "all":
            return list(range(steps))
        items = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                items.append(float(part) if "." in part or "e" in part.lower() else int(part))
            except ValueError:
                raise CollectError(f"steps to record: {part!r} is neither a step index nor a fraction") from None
    elif isinstance(spec, (int, float)):
        items = [spec]
    else:
        items = list(spec)
    out = set()
    for v in items:
        if isinstance(v, float):
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise CollectError(f"steps to record: fraction {v} is not in [0, 1]")
            out.add(min(math.floor(v * steps + 1e-9), steps - 1))
        else:
            i = int(v)
            if not -steps <= i < steps:
                raise CollectError(f"steps to record: step {i} is outside the schedule of {steps} steps "
                                   f"(indices 0..{steps - 1}, or negative from the end)")
            out.add(i % steps)
    if not out:
        raise CollectError("no steps to record")
    return sorted(out)


def token_indices(total: int, budget: int, seed: int, prompt_index: int, step: int) -> torch.Tensor:
    """The sorted token indices kept of a stream of `total` tokens (all of them when total <= budget)."""
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long)
    if total <= budget:
        return torch.arange(total)
    g = torch.Generator().manual_seed(mix_seed("tokens", seed, prompt_index, step))
    return torch.randperm(total, generator=g)[:budget].sort().values


def prompt_seed(record: PromptRecord, index: int, seed: int) -> int:
    """The noise seed of one prompt: its own `seed` column when given, else seed + prompt index."""
    return record.seed if record.seed is not None else (seed + index) % (2 ** 63)


def mix_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def default_prompts_per_shard(layout: ModelLayout, positions: list[Position], record_steps: list[int],
                              token_budget: int, dtype_bytes: int = 2) -> int:
    """Prompts per shard so that a shard is about SHARD_TARGET_BYTES (between 1 and MAX_PROMPTS_PER_SHARD)."""
    per_prompt = sum(len(record_steps) * (max(token_budget, 0) * dtype_bytes + 4) * layout.width_of(p)
                     for p in positions)
    return max(1, min(MAX_PROMPTS_PER_SHARD, SHARD_TARGET_BYTES // max(per_prompt, 1)))


# --- collection ----------------------------------------------------------------------------------------

@dataclass
class CollectResult:
    path: str
    total: int  # prompts in the run
    collected: int  # prompts stored by this call
    resumed: int  # prompts found already stored
    stopped: bool  # should_stop ended the run early
    complete: bool  # every prompt is stored
    dropped: int = 0  # prompts sampled by this call but not stored (their shard was not full): recollected on resume

    def __str__(self) -> str:
        state = "complete" if self.complete else ("stopped" if self.stopped else "incomplete")
        text = (f"{self.path}: {state}; {self.collected} prompts stored now, {self.resumed} were already stored, "
                f"{self.total} in all")
        if self.dropped:
            text += f"; {self.dropped} sampled prompts of an unfinished shard will be recollected on resume"
        return text


def collect(runner: Runner, prompts: list[PromptRecord], positions, store_path: str, steps: int, record_steps,
            token_budget: int, seed: int, progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None, dtype: str = "float16",
            prompts_per_shard: int | None = None, ranks: Ranks = SINGLE) -> CollectResult:
    """Collect `positions` at `record_steps` of a `steps`-step sampling of every prompt into the store at
    `store_path`, resuming whatever is already stored there (a store made with other settings is refused).
    `progress(done, total)` is called after each prompt; `should_stop()` is asked before each one. With
    several `ranks` (torchrun) each collects the prompts of its own shards; totals and progress are this
    rank's, `complete` is the whole store's."""
    layout = runner.layout
    chosen = parse_positions(positions, layout)
    want = parse_record_steps(record_steps, steps)
    if token_budget < 0:
        raise CollectError(f"token budget must be 0 (pooled means only) or more, got {token_budget}")
    if not prompts:
        raise CollectError("no prompts to collect")
    pps = prompts_per_shard or default_prompts_per_shard(layout, chosen, want, token_budget)
    config = {"steps": int(steps), "record_steps": want, "token_budget": int(token_budget), "seed": int(seed),
              "runner": runner.describe()}
    widths = {p.name: layout.width_of(p) for p in chosen}
    wanted = set(want)
    total = len(prompts)
    sampled = resumed = 0
    stopped = False
    with StoreWriter(store_path, layout.family, [p.name for p in chosen], widths, prompts, config,
                     prompts_per_shard=pps, dtype=dtype, ranks=ranks) as writer:
        mine = [i for i in range(total) if writer.owns(i)]
        total = len(mine)
        resumed = sum(writer.done(i) for i in mine)
        if progress:
            progress(resumed, total)
        done = resumed
        for i in mine:
            rec = prompts[i]
            if writer.done(i):
                continue
            if should_stop is not None and should_stop():
                stopped = True
                break
            rows, pooled = _collect_one(runner, rec, i, seed, steps, chosen, wanted, token_budget, widths)
            writer.add(i, rows, pooled)
            sampled += 1
            done += 1
            if progress:
                progress(done, total)
    complete = writer.complete
    stored = sum(s["prompts"][1] - s["prompts"][0] for k, s in writer.shards.items() if k % ranks.world == ranks.rank)
    return CollectResult(store_path, total, stored - resumed, resumed, stopped, complete, sampled - (stored - resumed))


def _collect_one(runner: Runner, rec: PromptRecord, i: int, seed: int, steps: int, positions: list[Position],
                 wanted: set, budget: int, widths: dict) -> tuple[dict, dict]:
    got: dict = {}
    picks: dict = {}  # token indices by (stream length, step): the same for every position of this prompt

    def sink(p: Position, x: torch.Tensor, step: int) -> None:
        if p not in positions or step not in wanted:
            raise CollectError(f"the runner delivered {p} at step {step}, which was not asked for")
        if (p, step) in got:
            raise CollectError(f"the runner delivered {p} at step {step} twice for prompt #{i}")
        if x.ndim != 3 or x.shape[-1] != widths[p.name]:
            raise CollectError(f"{p}: activations of shape {tuple(x.shape)}, expected [B, T, {widths[p.name]}]")
        tokens = x.detach().reshape(-1, x.shape[-1])
        mean = torch.mean(tokens, 0, dtype=torch.float32).cpu()
        idx = picks.get((len(tokens), step))
        if idx is None:
            idx = picks[(len(tokens), step)] = token_indices(len(tokens), budget, seed, i, step)
        got[(p, step)] = (tokens[idx.to(tokens.device)].cpu(), idx, mean)

    runner.run(rec, prompt_seed(rec, i, seed), steps, positions, wanted.__contains__, sink)
    rows, pooled = {}, {}
    order = sorted(wanted)
    for p in positions:
        missing = [s for s in order if (p, s) not in got]
        if missing:
            raise CollectError(f"prompt #{i} ({rec.id}): the model produced no activations at {p} for step(s) "
                               f"{', '.join(map(str, missing))}")
        parts = [got[(p, s)] for s in order]
        rows[p.name] = (torch.cat([a[0] for a in parts]),
                        torch.cat([torch.full((len(a[1]),), s, dtype=torch.int32) for s, a in zip(order, parts)]),
                        torch.cat([a[1] for a in parts]))
        pooled[p.name] = (torch.stack([a[2] for a in parts]), torch.tensor(order, dtype=torch.int32))
    return rows, pooled


def hash_weights(module: torch.nn.Module, h) -> None:
    """Feed a slice of `module`'s first, middle and last parameters (with their names) into hasher `h`: cheap
    even for a 12B model, and enough to tell one checkpoint from another."""
    params = list(module.named_parameters())
    for name, p in [params[0], params[len(params) // 2], params[-1]] if params else []:
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())


