"""Exact TopK SAE gradients that touch only the selected latents: the fast backward of SAE training.

With TopK, each row's loss depends on the encoder's pre-activations only at the k latents it keeps (and, for
AuxK, at the `k_aux` dead latents it picks), and on the decoder only at those rows. Plain autograd still pays
for the dense shapes: the encoder product's backward is two [rows, latents] × [latents, d] products (one for
`W_enc`, one for the input, only to sum it into `b_dec`'s gradient), and `embedding_bag`'s decoder backward
sorts every index. The two autograd Functions here give the same gradients from the selected (row, latent)
pairs alone:

- `picked(pre, sel, xs, sae)`: the pre-activations at `sel` [rows, m] (gathered from `pre`, computed without
  gradient), with backward `∂W_enc = Sᵀ (xs − b_dec)`, `∂b_enc = Sᵀ 1`, `∂b_dec = −(Sᵀ 1) W_enc`, where S is
  the sparse [rows, latents] matrix of the incoming gradient at `sel`;
- `decode(vals, idx, W_dec)`: `Σ_j vals[i, j] · W_dec[idx[i, j]]`, with backward `∂W_dec = Vᵀ g` (V sparse,
  the values at `idx`) and `∂vals[i, j] = g[i] · W_dec[idx[i, j]]` (a sampled product).

`Sᵀ y` is a sparse-dense product of `m` entries per row. The gradients equal the dense ones up to the order
of floating-point sums (`tests/test_sparse_grad.py`); training uses them on the CPU (train.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.autograd import Function
from torch.nn import functional as F


def scatter_rows(sel: Tensor, w: Tensor, y: Tensor, n: int) -> Tensor:
    """The [n, d] matrix whose row l is Σ over (i, j) with sel[i, j] = l of w[i, j] · y[i] (Sᵀ y)."""
    rows = torch.arange(sel.shape[0], device=sel.device).repeat_interleave(sel.shape[1])
    s = torch.sparse_coo_tensor(torch.stack([sel.reshape(-1), rows]), w.reshape(-1).to(y.dtype), (n, sel.shape[0]),
                                check_invariants=False)
    return torch.sparse.mm(s, y)


def scatter_sum(sel: Tensor, w: Tensor, n: int) -> Tensor:
    """[n] vector: Σ of w[i, j] over the pairs with sel[i, j] = l (Sᵀ 1)."""
    return torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, sel.reshape(-1), w.reshape(-1))


def sampled_dots(g: Tensor, W: Tensor, idx: Tensor) -> Tensor:
    """[rows, m]: g[i] · W[idx[i, j]], without forming the [rows, latents] product."""
    rows, m = idx.shape
    if rows * m == 0:
        return g.new_zeros(rows, m)
    crow = torch.arange(rows + 1, device=idx.device) * m
    with warnings.catch_warnings():  # "CSR support is in beta": this one product is all that is used of it
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), g.new_zeros(rows * m), (rows, W.shape[0]),
                                          check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values().view(rows, m)


class _Picked(Function):
    @staticmethod
    def forward(ctx, pre, sel, xs, W_enc, b_enc, b_dec):
        ctx.save_for_backward(sel, xs, W_enc, b_dec)
        return pre.gather(1, sel)

    @staticmethod
    def backward(ctx, g):
        sel, xs, W_enc, b_dec = ctx.saved_tensors
        n = W_enc.shape[0]
        g_xs = g_W = g_b = g_bd = None
        col = scatter_sum(sel, g, n) if ctx.needs_input_grad[4] or ctx.needs_input_grad[5] else None
        if ctx.needs_input_grad[2]:
            g_xs = F.embedding_bag(sel, W_enc, per_sample_weights=g.to(W_enc.dtype), mode="sum")
        if ctx.needs_input_grad[3]:
            g_W = scatter_rows(sel, g, xs - b_dec, n)
        if ctx.needs_input_grad[4]:
            g_b = col
        if ctx.needs_input_grad[5]:
            g_bd = -(col @ W_enc)
        return None, None, g_xs, g_W, g_b, g_bd


class _Decode(Function):
    @staticmethod
    def forward(ctx, vals, idx, W):
        ctx.save_for_backward(vals, idx, W)
        return F.embedding_bag(idx, W, per_sample_weights=vals.to(W.dtype), mode="sum")

    @staticmethod
    def backward(ctx, g):
        vals, idx, W = ctx.saved_tensors
        g_vals = sampled_dots(g, W, idx).to(vals.dtype) if ctx.needs_input_grad[0] else None
        g_W = scatter_rows(idx, vals, g, W.shape[0]) if ctx.needs_input_grad[2] else None
        return g_vals, None, g_W


def picked(pre: Tensor, sel: Tensor, xs: Tensor, sae) -> Tensor:
    """`sae.pre_acts(xs).gather(1, sel)` with its gradient to the encoder and `b_dec` (and `xs` if it needs
    one); `pre` is `sae.pre_acts(xs)`, computed without gradient, whose values are returned."""
    return _Picked.apply(pre.detach(), sel, xs, sae.W_enc, sae.b_enc, sae.b_dec)


def decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j vals[:, j] · W_dec[idx[:, j]] (as `embedding_bag`), with the sparse backward above."""
    return _Decode.apply(vals, idx, W_dec)
