"""The fast gate: decide which tokens a TopK SAE's harmful latents may gate before paying the full encode.

The exact gate (`steering.PositionSteerer`) encodes every token against all L latents to find its TopK code,
then sums the harmful codes: g = Σ_{j∈H} z_j. Most tokens of a safe image carry g far below the threshold.
The fast gate first computes only a few pre-activations per token, those of the harmful latents H and of m
"probe" latents P (a fixed subset of the others: by default about L/24, those whose pre-activations tend to run
highest), and from them an upper bound B ≥ g:

- a harmful latent j is in the TopK code only if its pre-activation p_j is at least c_k, the k-th largest
  pre-activation over all latents; c_k is at least the k-th largest over any subset, so over H ∪ P;
- hence g ≤ B = Σ_{j∈H, p_j ≥ kth(p_{H∪P})} relu(p_j), computed from the small product alone.

Tokens with B ≤ the gate's floor provably do not pass; the rest go through the exact encode and the exact
rule. The decision is therefore the exact gate's, and so is every steered token (steering reads the same
exact codes). Floating point: the small product may round differently from the full one. Both are within
γ·Σ_i |w_i x_i| ≤ γ·(‖w‖‖x‖ + |b|) of the true value (γ = (d+2)u, u the unit roundoff of the accumulation;
half precision products are assumed to accumulate in float32, as PyTorch's CPU and CUDA kernels do, and their
result then rounds once more to the half type), so B is computed from the pre-activations widened by that
error and the comparison keeps a margin for the rounding of g's own sum and of the threshold. The bound is
then still an upper bound on the g the exact gate computes, and the decision stays exact.

How much it saves depends on the dictionary: on how far below the threshold B stays on safe tokens, which
more probes tighten (at m/L of the full encode's cost). So the screen is a cascade of stages, each adding rows
to the one before and multiplying a token only by the rows it adds: the harmful rows alone (B = Σ_{j∈H}
relu(p_j), with no cut: enough where the harmful latents' pre-activations stay negative on safe tokens, as in a
trained dictionary), then the probes, then, for the tokens still not ruled out, about L/6 probes
(`default_refine`; the rows it adds are gathered from the encoder at each call rather than kept, so they cost
no memory between calls); only the tokens left get the full encode. Any subset of latents gives a valid bound,
so the cascade keeps the decision exact. `benchmarks/steering_overhead.py` measures it against the exact gate.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .sae import SparseAutoencoder

PROBES: int | None = None  # probe latents per SAE; None: `default_probes` (at most all the non-harmful ones)
REFINE: int | None = None  # probe latents of the second screen; None: `default_refine`; 0: no second screen

_screens: "weakref.WeakKeyDictionary[SparseAutoencoder, tuple]" = weakref.WeakKeyDictionary()


def default_probes(sae: SparseAutoencoder) -> int:
    """About 1/24 of the latents (4 % of the full encode's product), at least 2k."""
    return max(2 * sae.k, sae.latents // 24)


def default_refine(sae: SparseAutoencoder) -> int:
    """About 1/6 of the latents for the tokens the first screen lets through."""
    return sae.latents // 6


def _unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


class Screen:
    """One stage of the cascade: rows of one TopK SAE's encoder (its working copy: device and dtype as the model
    runs) that bound a token's harmful mass, in the accumulation precision: the harmful rows, then probes.
    `after`: the stage whose rows this one's begin with, so that a token screened there is multiplied only by
    the rows this stage adds (`extend`). `gather`: take the added rows from the encoder at each call instead of
    keeping a copy. `then`: the stage the tokens this one lets through go to next (None: the full encode)."""

    then: "Screen | None" = None

    def __init__(self, sae: SparseAutoencoder, harmful: Tensor, probes: int | None = None, gather: bool = False,
                 after: "Screen | None" = None):
        dev, dtype = sae.W_enc.device, sae.W_enc.dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        H = harmful.to(dev).long()
        base = H if after is None else after.rows
        others = torch.ones(sae.latents, dtype=torch.bool, device=dev)
        others[base] = False
        # Any probes give a valid bound; the ones whose pre-activations tend to run high give a tight one. Scaled
        # inputs have ‖x‖² ≈ d, so a latent's pre-activation spreads about b_j ± ‖w_j‖: take the largest b_j + 2‖w_j‖.
        reach = (sae.b_enc.float() + 2 * sae.W_enc.float().norm(dim=1)).masked_fill(~others, -float("inf"))
        had = len(base) - len(H)
        m = min(default_probes(sae) if probes is None else probes, had + int(others.sum()))
        pick = reach.topk(max(m - had, 0)).indices
        self.added = pick if after is not None else torch.cat([H, pick])
        self.rows = torch.cat([base, pick])
        self.after, self.h, self.k, self.d, self.m = after, len(H), sae.k, sae.d, max(m, had)
        W = sae.W_enc[self.added].to(self.acc)
        self.W, self.source = (None, sae.W_enc) if gather else (W, None)
        self.b_added = sae.b_enc[self.added].to(self.acc)
        self.b = sae.b_enc[self.rows].to(self.acc)
        self.norms = W.norm(dim=1) if after is None else torch.cat([after.norms, W.norm(dim=1)])
        self.u_out = _unit(dtype)  # the full product's result is rounded to the working dtype
        self.gamma = (self.d + 2) * _unit(self.acc) / (1 - (self.d + 2) * _unit(self.acc))

    def stages(self) -> "list[Screen]":
        """This stage and the ones after it, in the order tokens meet them."""
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.then
        return out

    def centred(self, xs: Tensor, b_dec: Tensor) -> Tensor:
        """The same subtraction, in the same dtype, as `SparseAutoencoder.pre_acts`, in the accumulation type."""
        return (xs - b_dec).to(self.acc)

    def added_rows(self) -> Tensor:
        """The encoder rows this stage adds to the one it follows, kept or gathered."""
        return self.W if self.W is not None else self.source.index_select(0, self.added).to(self.acc)

    def extend(self, xc: Tensor, pre: Tensor | None = None) -> Tensor:
        """[N, rows] pre-activations over this stage's rows for centred inputs xc, given `pre`, those over the rows
        of the stage it follows (None: computed)."""
        if self.after is not None and pre is None:
            pre = self.after.extend(xc)
        if not self.added.numel():
            return pre
        new = torch.addmm(self.b_added, xc, self.added_rows().t())
        return new if pre is None else torch.cat([pre, new], 1)

    def bound(self, xs: Tensor, b_dec: Tensor) -> Tensor:
        """[N] upper bound (float) on the harmful mass the exact gate computes for scaled inputs xs [N, d]."""
        xc = self.centred(xs, b_dec)
        return self.mass_bound(xc, self.extend(xc))

    def mass_bound(self, xc: Tensor, pre: Tensor) -> Tensor:
        """[N] the bound from centred inputs xc and their pre-activations over this stage's rows."""
        # Cauchy–Schwarz on Σ|w_i x_i|, with a little room for the rounding of the norms themselves
        size = (xc.norm(dim=1, keepdim=True) * self.norms + self.b.abs()) * (1 + 1e-3)
        err = 2 * self.gamma * size + 2 * self.u_out * (pre.abs() + 2 * self.gamma * size)
        hi, lo = pre + err, pre - err
        mass_hi = hi[:, :self.h].clamp_min(0)
        if hi.shape[1] >= self.k:
            cut = lo.topk(self.k, dim=1, sorted=False).values.amin(1, keepdim=True)
            mass_hi = mass_hi * (hi[:, :self.h] >= cut)
        g = mass_hi.sum(1)
        # g's own sum over h codes, rounded in the accumulation type and once more in the working dtype
        return g * (1 + (self.h + 2) * _unit(self.acc) + 2 * self.u_out)

    def may_pass(self, xs: Tensor, b_dec: Tensor, floor: float) -> Tensor:
        """[N] bool: the tokens that may have harmful mass above `floor` (the others provably do not); the
        threshold itself may round down to the working dtype in the exact comparison. The tokens a stage cannot
        rule out go on to the next one, which multiplies them only by the rows it adds."""
        keep = torch.zeros(xs.shape[0], dtype=torch.bool, device=xs.device)
        for stage, alive, _, _ in self.walk(xs, b_dec, floor):
            if stage is None:
                keep[alive] = True
        return keep

    def walk(self, xs: Tensor, b_dec: Tensor, floor: float):
        """The cascade step by step: yields (stage, alive, xc, pre) before each stage — the indices of the tokens
        that reach it, their centred inputs and their pre-activations over the previous stage's rows (None at the
        first) — and last (None, the tokens left for the full encode, None, None)."""
        xc = self.centred(xs, b_dec)
        alive, pre, stage = torch.arange(xc.shape[0], device=xc.device), None, self
        while stage is not None and alive.numel():
            yield stage, alive, xc, pre
            pre = stage.extend(xc, pre)
            ok = stage.mass_bound(xc, pre) > floor * (1 - 2 * stage.u_out)
            if not bool(ok.all()):  # copy only when a token was ruled out
                alive, xc, pre = alive[ok], xc[ok], pre[ok]
            stage = stage.then
        yield None, alive, None, None


def screen(sae: SparseAutoencoder, harmful: Tensor, probes: int | None = None) -> Screen:
    """The `Screen` of this SAE (working copy), made once and remade if its encoder was changed or moved."""
    probes = PROBES if probes is None else probes  # None: the Screen's default
    refine = default_refine(sae) if REFINE is None else REFINE
    # a memory manager may move the working copy (adapters/comfy/memory.py): the screen follows it
    key = (sae.W_enc.device, sae.W_enc.dtype, _version(sae.W_enc), _version(sae.b_enc), tuple(harmful.tolist()), probes,
           refine)
    got = _screens.get(sae)
    if got is None or got[0] != key:
        first = last = Screen(sae, harmful, 0)  # the harmful rows alone: Σ relu(p_j) over H already bounds g
        for m, gather in ((probes, False), (refine, True)):
            room = sae.latents - len(harmful) - last.m
            if room > 0 and (m is None or m > last.m):
                last.then = Screen(sae, harmful, m, gather=gather, after=last)
                last = last.then
        got = _screens[sae] = (key, first)
    return got[1]


def _version(t: Tensor):
    """The tensor's in-place version counter; tensors made under `torch.inference_mode()` (ComfyUI's executor)
    keep none, and are then known by their storage."""
    try:
        return t._version
    except RuntimeError:
        return ("inference", t.data_ptr())


def gated_codes(sae: SparseAutoencoder, harmful: Tensor, xs: Tensor, floor: float, codes) -> tuple[Tensor, Tensor]:
    """The tokens of scaled inputs xs [N, d] whose harmful mass exceeds `floor`, as (indices [G], their harmful
    codes [G, h]); `codes(xs)` is the exact harmful code, run only on the tokens the screen lets through."""
    cand = screen(sae, harmful).may_pass(xs, sae.b_dec, floor).nonzero().squeeze(1)
    if cand.numel() == 0:
        return cand, xs.new_zeros(0, len(harmful))
    z_H = codes(xs[cand])
    keep = z_H.sum(-1) > floor
    return cand[keep], z_H[keep]
