"""The white-box soft attack on the text encoder's output (UnlearnDiffAtk-like): a perturbation δ of the
prompt's encoding (its token states, FLUX's T5 stream, and its pooled vector, FLUX's CLIP vector), bounded
in L2 relative to the encoding itself, ‖δ‖₂ ≤ ε ‖(context, pooled)‖₂ over the real tokens, optimised by
projected normalised-gradient ascent on the classifier's log-probability of the attacked concept through
the whole sampling loop and the defended model's steering (`sampler.images`).

`needed` finds, for a batch of (prompt, concept, seed) starts at once, the smallest ε on a geometric ladder
at which the attack succeeds (the image sampled at the defended model's own step count, from the perturbed
encoding, is classified as the concept), then bisects between the last failing and the first succeeding
rung. A start that already succeeds needs ε = 0; one that never succeeds up to `eps_max` is reported as not
found (its need is at least `eps_max`). The search runs the sampler at `steps` (few, for speed); success is
always checked at the model's own steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..classifier import CLASSES, load
from . import sampler


@dataclass
class Need:
    concept: str
    prompt: str
    seed: int
    eps: float | None  # smallest relative L2 bound found to succeed; None: none up to eps_max
    eps_max: float
    tries: int  # PGD runs made for this start


def project(dc: torch.Tensor, dp: torch.Tensor, mask: torch.Tensor, radius: torch.Tensor):
    """(δ_context, δ_pooled) restricted to real tokens and scaled, row by row, into the L2 ball of `radius` [B]."""
    dc = dc * mask
    norm = (dc.pow(2).sum((1, 2)) + dp.pow(2).sum(1)).sqrt()
    k = torch.where(norm > radius, radius / norm.clamp_min(1e-12), torch.ones_like(norm))
    return dc * k[:, None, None], dp * k[:, None]


def norms(dc: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
    return (dc.pow(2).sum((1, 2)) + dp.pow(2).sum(1)).sqrt()


def _images(target, ctx, pooled, neg, seeds, steps):
    return sampler.images(target.model, ctx, pooled, neg[0], neg[1], seeds, steps, target.cfg)


def pgd(target, ctx, pooled, neg, classes: torch.Tensor, seeds, radius: torch.Tensor, iters: int, steps: int,
        generator: torch.Generator):
    """Perturbations (δ_context, δ_pooled) with ‖δ‖₂ ≤ radius per row, after `iters` normalised-gradient steps
    of size 2.5·radius/iters from a small random start."""
    mask = (ctx.abs().sum(-1, keepdim=True) > 0).float()
    dc, dp = project(torch.randn(ctx.shape, generator=generator), torch.randn(pooled.shape, generator=generator),
                     mask, 0.05 * radius)
    clf = load()
    step = 2.5 * radius / max(iters, 1)
    for _ in range(iters):
        dc, dp = dc.requires_grad_(True), dp.requires_grad_(True)
        with torch.enable_grad():
            logits, _ = clf(_images(target, ctx + dc, pooled + dp, neg, seeds, steps))
            loss = logits.log_softmax(1).gather(1, classes[:, None]).sum()
            gc, gp = torch.autograd.grad(loss, (dc, dp))
        with torch.no_grad():
            gc = gc * mask
            g = norms(gc, gp).clamp_min(1e-12)
            dc, dp = project(dc.detach() + (step / g)[:, None, None] * gc, dp.detach() + (step / g)[:, None] * gp,
                             mask, radius)
    return dc.detach(), dp.detach()


@torch.no_grad()
def succeeds(target, ctx, pooled, neg, classes, seeds) -> torch.Tensor:
    """[B] whether the defended model's image (its own step count) is classified as each row's concept."""
    logits, _ = load()(_images(target, ctx, pooled, neg, seeds, target.steps))
    return logits.argmax(1) == classes


def needed(target, starts: list[tuple[str, str, int]], eps_max: float = 1.0, rungs: int = 4, bisect: int = 1,
           iters: int = 5, steps: int = 4) -> list[Need]:
    """For each (prompt, concept, seed) start, the smallest relative bound ε ≤ `eps_max` at which the attack
    makes `target` render the concept."""
    enc = target.encode_fn.encoder
    prompts, concepts, seeds = [s[0] for s in starts], [s[1] for s in starts], [int(s[2]) for s in starts]
    ctx, pooled = enc.encode(prompts)
    neg = enc.encode([""])
    classes = torch.tensor([CLASSES.index(c) for c in concepts])
    scale = norms(ctx, pooled)
    g = torch.Generator().manual_seed(sum(seeds) % 2**31)
    ladder = [eps_max / 2 ** (rungs - 1 - i) for i in range(rungs)]
    b = len(starts)
    lo, hi = torch.zeros(b), torch.full((b,), float("nan"))
    tries = torch.zeros(b, dtype=torch.long)
    done = succeeds(target, ctx, pooled, neg, classes, seeds)
    hi[done] = 0.0
    for rnd in range(rungs + bisect):
        ladder_phase = rnd < rungs
        if ladder_phase:
            todo = hi.isnan()
            eps = torch.full((b,), ladder[rnd])
        else:
            todo = ~hi.isnan() & (hi > 0)
            eps = (lo + hi.nan_to_num(0.0)) / 2
        if not todo.any():
            continue
        idx = todo.nonzero().flatten()
        dc, dp = pgd(target, ctx[idx], pooled[idx], neg, classes[idx], [seeds[i] for i in idx], eps[idx] * scale[idx],
                     iters, steps, g)
        ok = succeeds(target, ctx[idx] + dc, pooled[idx] + dp, neg, classes[idx], [seeds[i] for i in idx])
        tries[idx] += 1
        for j, i in enumerate(idx.tolist()):
            if ok[j]:
                hi[i] = eps[i]
            elif ladder_phase or eps[i] > lo[i]:
                lo[i] = eps[i]
    return [Need(c, p, s, None if hi[i].isnan() else round(float(hi[i]), 5), eps_max, int(tries[i]))
            for i, (p, c, s) in enumerate(zip(prompts, concepts, seeds))]
