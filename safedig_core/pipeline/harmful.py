"""Harmful latents (docs/METHOD_NOTES.md §4): which SAE latents fire more on unsafe than on safe source tokens.

One streamed pass over the labelled rows of a domain accumulates, per latent and per group of rows
(safe, unsafe, and each unsafe category), the row count, Σz, Σz² and the firing count (float64 sums;
codes are never stored). From them, per latent j and per comparison (all unsafe vs safe, and each
category vs safe):
- standardized mean difference `smd = (μ_unsafe − μ_safe) / sqrt((σ²_unsafe + σ²_safe) / 2)` of the
  code z_j over tokens (0 when the latent never varies);
- frequency floor: the latent fires on at least `min_unsafe_rate` of the compared unsafe tokens;
- safe specificity: it fires on at most `max_safe_rate` of safe tokens, and at most `max_safe_ratio`
  times as often on safe as on unsafe tokens;
- the comparison's score is the smd where both rules hold and the smd is positive, else 0.
A latent *fires* on a token when its code is at least `fire_min` (default 5 %) of the token's norm
about `b_dec` (scaled units): TopK always fills its k slots, and the smallest codes are noise-level
fill that would otherwise make every latent look common on safe tokens.
A latent's selection score is the best of its overall score and its category scores (categories with
at least `min_category_tokens` tokens), so a latent specific to one risk category qualifies even when
that category is a small part of the unsafe data. Latents scoring at least `threshold` are kept, best
first, at most `max_latents` of them. The safe value of a kept latent is its mean code on safe tokens
(usually ≈ 0): what Blend puts in its place.

Token-level smd is bounded by sparsity: a latent that fires (z ≈ const) on a fraction p of unsafe
tokens and never on safe ones scores ≈ sqrt(2p / (1 − p)): 0.25 ↔ p ≈ 3 %, 0.5 ↔ p ≈ 11 %.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..sae import SparseAutoencoder
from .data import Stream, batch_x, checked


class HarmfulError(ValueError):
    """Data that cannot score harmful latents (no unsafe rows, no safe rows, no row metadata)."""


@dataclass
class HarmfulConfig:
    threshold: float = 0.25  # minimum selection score (smd)
    max_latents: int = 64
    min_unsafe_rate: float = 0.01  # frequency floor on the compared unsafe tokens
    max_safe_rate: float = 0.05  # fires on at most this fraction of safe tokens ...
    max_safe_ratio: float = 0.25  # ... and at most this times as often as on the unsafe ones
    per_category: bool = True  # a latent may qualify through one category alone
    min_category_tokens: int = 256  # smaller categories are reported but do not select latents
    fire_min: float = 0.05  # a code counts as firing from this fraction of the token's norm about b_dec

    def check(self) -> None:
        problems = []
        if self.max_latents < 0:
            problems.append(f"max_latents={self.max_latents} must be ≥ 0")
        for name in ("min_unsafe_rate", "max_safe_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not 0.0 <= self.fire_min < 1.0:
            problems.append(f"fire_min={self.fire_min} must be in [0, 1)")
        if self.max_safe_ratio < 0:
            problems.append(f"max_safe_ratio={self.max_safe_ratio} must be ≥ 0")
        if problems:
            raise HarmfulError("bad harmful-latent config: " + "; ".join(problems))


def categories_of(record: Any) -> list[str]:
    """Risk categories of an unsafe prompt record (a comma list is several; none: 'unspecified')."""
    cats = [c.strip() for c in str(getattr(record, "category", "") or "").split(",") if c.strip()]
    return cats or ["unspecified"]


@dataclass
class LatentStats:
    """Per-group sums over tokens. Groups: 0 = safe, 1 = unsafe, 2.. = `categories` (unsafe only)."""
    latents: int
    categories: list[str]
    device: Any = "cpu"
    n: Tensor = field(init=False)  # [G] tokens
    s1: Tensor = field(init=False)  # [G, L] Σ z
    s2: Tensor = field(init=False)  # [G, L] Σ z²
    fires: Tensor = field(init=False)  # [G, L] tokens with z > 0

    def __post_init__(self):
        G, L = 2 + len(self.categories), self.latents
        self.n = torch.zeros(G, dtype=torch.float64, device=self.device)
        self.s1 = torch.zeros(G, L, dtype=torch.float64, device=self.device)
        self.s2 = torch.zeros(G, L, dtype=torch.float64, device=self.device)
        self.fires = torch.zeros(G, L, dtype=torch.float64, device=self.device)

    def add(self, vals: Tensor, idx: Tensor, groups: Tensor, fired: Tensor | None = None) -> None:
        """Add tokens given as TopK codes (vals, idx [N, k]) with their group membership [N, G] (bool);
        `fired` [N, k] says which codes count as firing (default: every positive one)."""
        L = self.latents
        v = vals.double()
        f = (v > 0 if fired is None else fired).double()
        for g in range(groups.shape[1]):
            m = groups[:, g]
            if not bool(m.any()):
                continue
            i, vg, fg = idx[m].reshape(-1), v[m].reshape(-1), f[m].reshape(-1)
            self.n[g] += m.sum()
            self.s1[g] += torch.bincount(i, weights=vg, minlength=L)
            self.s2[g] += torch.bincount(i, weights=vg * vg, minlength=L)
            self.fires[g] += torch.bincount(i, weights=fg, minlength=L)

    def mean(self, g: int) -> Tensor:
        return self.s1[g] / self.n[g].clamp_min(1)

    def var(self, g: int) -> Tensor:
        return (self.s2[g] / self.n[g].clamp_min(1) - self.mean(g) ** 2).clamp_min(0)

    def rate(self, g: int) -> Tensor:
        return self.fires[g] / self.n[g].clamp_min(1)

    def score(self, g: int, cfg: HarmfulConfig) -> Tensor:
        """Score [L] of unsafe group g against safe (group 0), rules applied (0 where they fail)."""
        sd = ((self.var(g) + self.var(0)) / 2).sqrt()
        diff = self.mean(g) - self.mean(0)
        smd = torch.where(sd > 1e-12, diff / sd.clamp_min(1e-12), torch.zeros_like(sd))
        r_u, r_s = self.rate(g), self.rate(0)
        ok = (r_u >= cfg.min_unsafe_rate) & (r_s <= cfg.max_safe_rate) & (r_s <= cfg.max_safe_ratio * r_u) & (smd > 0)
        return torch.where(ok, smd, torch.zeros_like(smd))


@dataclass
class HarmfulScores:
    indices: list[int]  # selected latents, best first
    scores: list[float]  # their selection scores
    safe_values: list[float]  # their mean code on safe tokens
    overall: Tensor  # [L] overall score (all unsafe vs safe), rules applied
    per_category: dict[str, Tensor]  # category -> [L] score, rules applied
    selection: Tensor  # [L] the score latents were ranked by
    unsafe_rate: Tensor  # [L] firing rate on unsafe tokens
    safe_rate: Tensor  # [L] firing rate on safe tokens
    tokens: dict[str, int]  # "safe", "unsafe", and per category

    def category_scores(self) -> dict[str, list[float]]:
        """Per-category scores of the selected latents (aligned with `indices`), for the dictionary."""
        idx = torch.tensor(self.indices, dtype=torch.long)
        return {c: [round(float(v), 6) for v in s[idx]] for c, s in self.per_category.items()}

    def metadata(self) -> dict:
        return {"harmful_by_category": self.category_scores(), "harmful_tokens": dict(self.tokens)}


@torch.no_grad()
def collect_stats(sae: SparseAutoencoder, data: Any, prompts: list | None = None, *, position: Any = None,
                  domain: str | None = "source", batch_size: int = 4096, device: Any = None,
                  max_batches: int | None = None, fire_min: float = HarmfulConfig.fire_min) -> LatentStats:
    """One streamed pass over the safe and unsafe rows of `domain` (None: every domain).

    `prompts` are the PromptRecord-like objects that the batches' `prompt` indices point into
    (default: `data.prompts`); only their `label`, `category` and `domain` are read."""
    if prompts is None:
        prompts = getattr(data, "prompts", None)
    if not prompts:
        raise HarmfulError("scoring harmful latents needs the prompt records (labels) of the rows; none were given")
    where = f"the {domain} domain" if domain else "the data"
    in_dom = [domain is None or getattr(r, "domain", "source") == domain for r in prompts]
    unsafe = [ok and getattr(r, "label", "") == "unsafe" for ok, r in zip(in_dom, prompts)]
    safe = [ok and getattr(r, "label", "") == "safe" for ok, r in zip(in_dom, prompts)]
    if not any(unsafe):
        raise HarmfulError(f"no unsafe prompts in {where} (all-safe data): harmful latents are found by "
                           "contrasting unsafe with safe prompts, so add unsafe prompts")
    if not any(safe):
        raise HarmfulError(f"no safe prompts in {where}: harmful latents are found by contrasting unsafe "
                           "with safe prompts, so add safe prompts")
    cats = sorted({c for r, u in zip(prompts, unsafe) if u for c in categories_of(r)})
    member = torch.zeros(len(prompts), 2 + len(cats), dtype=torch.bool)
    member[:, 0] = torch.tensor(safe)
    member[:, 1] = torch.tensor(unsafe)
    for i, (r, u) in enumerate(zip(prompts, unsafe)):
        if u:
            for c in categories_of(r):
                member[i, 2 + cats.index(c)] = True
    dev = torch.device(device) if device is not None else sae.W_dec.device
    member = member.to(dev)
    stats = LatentStats(sae.latents, cats, dev)
    wanted = [i for i in range(len(prompts)) if safe[i] or unsafe[i]]
    stream = Stream(data, position, batch_size, wanted, shuffle=False)
    for b, batch in enumerate(stream.epoch(0)):
        if max_batches is not None and b >= max_batches:
            break
        pr = getattr(batch, "prompt", None)
        if not isinstance(pr, Tensor):
            raise HarmfulError("batches carry no `prompt` indices: cannot tell safe from unsafe rows")
        x = checked(batch_x(batch), sae.d, f"batch {b}")
        pr = pr.long().to(dev)
        if len(pr) and (int(pr.min()) < 0 or int(pr.max()) >= len(prompts)):
            raise HarmfulError(f"batch {b}: prompt index out of range 0..{len(prompts) - 1}")
        groups = member[pr]
        keep = groups.any(1)
        if not bool(keep.any()):
            continue
        xs = sae.prepare(x.to(dev, sae.W_dec.dtype)[keep])
        vals, idx = sae.encode_sparse(xs)
        fired = vals > fire_min * (xs - sae.b_dec).norm(dim=1, keepdim=True) if fire_min > 0 else vals > 0
        stats.add(vals, idx, groups[keep], fired)
    if stats.n[1] == 0:
        raise HarmfulError(f"no unsafe rows in {where} at this position (all-safe data): harmful latents "
                           "are found by contrasting unsafe with safe tokens")
    if stats.n[0] == 0:
        raise HarmfulError(f"no safe rows in {where} at this position: harmful latents are found by "
                           "contrasting unsafe with safe tokens")
    return stats


def select_latents(stats: LatentStats, cfg: HarmfulConfig | None = None) -> HarmfulScores:
    """Scores and selection from accumulated statistics (see the module docstring)."""
    cfg = cfg or HarmfulConfig()
    cfg.check()
    overall = stats.score(1, cfg)
    per_cat = {c: stats.score(2 + i, cfg) for i, c in enumerate(stats.categories)}
    selection = overall.clone()
    if cfg.per_category:
        for i, c in enumerate(stats.categories):
            if stats.n[2 + i] >= cfg.min_category_tokens:
                selection = torch.maximum(selection, per_cat[c])
    order = torch.argsort(selection, descending=True, stable=True)
    order = order[selection[order] >= cfg.threshold][: cfg.max_latents]
    order = order[selection[order] > 0]
    safe_mean = stats.mean(0)
    tokens = {"safe": int(stats.n[0]), "unsafe": int(stats.n[1])}
    tokens.update({c: int(stats.n[2 + i]) for i, c in enumerate(stats.categories)})
    return HarmfulScores(
        indices=[int(j) for j in order], scores=[float(selection[j]) for j in order],
        safe_values=[float(safe_mean[j]) for j in order], overall=overall.float().cpu(),
        per_category={c: s.float().cpu() for c, s in per_cat.items()}, selection=selection.float().cpu(),
        unsafe_rate=stats.rate(1).float().cpu(), safe_rate=stats.rate(0).float().cpu(), tokens=tokens)


def find_harmful(sae: SparseAutoencoder, data: Any, prompts: list | None = None, cfg: HarmfulConfig | None = None,
                 **kw) -> HarmfulScores:
    """`collect_stats` then `select`: score every latent and keep the harmful ones."""
    cfg = cfg or HarmfulConfig()
    cfg.check()
    kw.setdefault("fire_min", cfg.fire_min)
    return select_latents(collect_stats(sae, data, prompts, **kw), cfg)


@torch.no_grad()
def image_codes(store, p, steerer, prompts: list[int], max_batches: int = 64) -> tuple[Tensor, Tensor]:
    """(the harmful codes [N, h] of the stored tokens of `prompts` at `p`, from at most `max_batches` batches of
    4096 rows; the image each token belongs to, its (prompt, sampler step) group [N])."""
    codes, prompt, step = [], [], []
    for _, b in zip(range(max_batches), store.iter_batches(p, 4096, prompts=prompts)):
        codes.append(steerer.codes(b.x).float())
        prompt.append(b.prompt)
        step.append(b.step)
    if not codes:
        return torch.zeros(0, len(steerer.harmful)), torch.zeros(0, dtype=torch.long)
    _, group = torch.unique(torch.stack([torch.cat(prompt).long(), torch.cat(step).long()], 1), dim=0,
                            return_inverse=True)
    return torch.cat(codes), group


def image_peaks(mass: Tensor, group: Tensor) -> Tensor:
    """The max of the per-token `mass` over each image (`image_codes`' groups): the per-image gate's statistic."""
    if not group.numel():
        return torch.zeros(0)
    return torch.full((int(group.max()) + 1,), float("-inf")).scatter_reduce(0, group, mass, "amax")


def harmful_peaks(store, p, steerer, prompts: list[int], max_batches: int = 64) -> tuple[Tensor, Tensor]:
    """(harmful mass of each stored token, its max per image) at `p` over the stored tokens of `prompts`."""
    codes, group = image_codes(store, p, steerer, prompts, max_batches)
    mass = codes.sum(-1)
    return mass, image_peaks(mass, group)
