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
more probes tighten (at m/L of the full encode's cost). So the screen is a cascade: the tokens the first screen
cannot rule out are screened again with more probes (by default about L/6, `default_refine`; their rows are
gathered from the encoder at each call rather than kept, so they cost no memory between calls), and only those
left get the full encode. Any subset of latents gives a valid bound, so the cascade keeps the decision exact.
`benchmarks/steering_overhead.py` measures both.
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
    """The harmful and probe rows of one TopK SAE's encoder (its working copy: device and dtype as the model
    runs), in the accumulation precision; `gather`: take them from the encoder at each call instead of keeping
    a copy. `then`: the screen the tokens this one lets through go to next (None: the full encode)."""

    then: "Screen | None" = None

    def __init__(self, sae: SparseAutoencoder, harmful: Tensor, probes: int | None = None, gather: bool = False):
        dev, dtype = sae.W_enc.device, sae.W_enc.dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        H = harmful.to(dev).long()
        others = torch.ones(sae.latents, dtype=torch.bool, device=dev)
        others[H] = False
        # Any probes give a valid bound; the ones whose pre-activations tend to run high give a tight one. Scaled
        # inputs have ‖x‖² ≈ d, so a latent's pre-activation spreads about b_j ± ‖w_j‖: take the largest b_j + 2‖w_j‖.
        reach = (sae.b_enc.float() + 2 * sae.W_enc.float().norm(dim=1)).masked_fill(~others, -float("inf"))
        m = min(default_probes(sae) if probes is None else probes, int(others.sum()))
        pick = reach.topk(m).indices
        rows = torch.cat([H, pick])
        self.h, self.k, self.d, self.m = len(H), sae.k, sae.d, m
        W = sae.W_enc[rows].to(self.acc)
        self.W, self.rows, self.source = (None, rows, sae.W_enc) if gather else (W, None, None)
        self.b = sae.b_enc[rows].to(self.acc)
        self.norms = W.norm(dim=1)
        self.u_out = _unit(dtype)  # the full product's result is rounded to the working dtype
        self.gamma = (self.d + 2) * _unit(self.acc) / (1 - (self.d + 2) * _unit(self.acc))

    def bound(self, xs: Tensor, b_dec: Tensor) -> Tensor:
        """[N] upper bound (float) on the harmful mass the exact gate computes for scaled inputs xs [N, d]."""
        xc = (xs - b_dec).to(self.acc)  # the same subtraction, in the same dtype, as `SparseAutoencoder.pre_acts`
        W = self.W if self.W is not None else self.source.index_select(0, self.rows).to(self.acc)
        pre = torch.addmm(self.b, xc, W.t())
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
        threshold itself may round down to the working dtype in the exact comparison. The tokens it cannot rule
        out go through `then`, when there is one."""
        keep = self.bound(xs, b_dec) > floor * (1 - 2 * self.u_out)
        if self.then is not None:
            left = keep.nonzero().squeeze(1)
            if left.numel():
                keep[left] = self.then.may_pass(xs[left], b_dec, floor)
        return keep


def screen(sae: SparseAutoencoder, harmful: Tensor, probes: int | None = None) -> Screen:
    """The `Screen` of this SAE (working copy), made once and remade if its encoder was changed or moved."""
    probes = PROBES if probes is None else probes  # None: the Screen's default
    refine = default_refine(sae) if REFINE is None else REFINE
    # a memory manager may move the working copy (adapters/comfy/memory.py): the screen follows it
    key = (sae.W_enc.device, sae.W_enc.dtype, _version(sae.W_enc), _version(sae.b_enc), tuple(harmful.tolist()), probes,
           refine)
    got = _screens.get(sae)
    if got is None or got[0] != key:
        first = Screen(sae, harmful, probes)
        if refine > first.m and first.m < sae.latents - len(harmful):
            first.then = Screen(sae, harmful, refine, gather=True)
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
