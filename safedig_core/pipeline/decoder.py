"""The decoder-row constraint that SAE training and decoder adaptation share: rows stay unit norm (the gradient
along each row is removed before the step, rows renormalised after it), and decoding in the scaled space."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..sae import SparseAutoencoder


@torch.no_grad()
def normalize_decoder(sae: SparseAutoencoder) -> None:
    n = sae.W_dec.norm(dim=1, keepdim=True)
    sae.W_dec.div_(n + torch.finfo(sae.W_dec.dtype).eps)


@torch.no_grad()
def remove_parallel_grad(sae: SparseAutoencoder) -> None:
    """Drop the part of each decoder row's gradient along the row (it would only change the norm)."""
    g, w = sae.W_dec.grad, sae.W_dec
    if g is not None:
        g.sub_((g * w).sum(1, keepdim=True) * w)


def decode_scaled(sae: SparseAutoencoder, vals: Tensor, idx: Tensor, bias: bool = True) -> Tensor:
    """Scaled reconstruction Σ vals·W_dec[idx] (+ b_dec), touching only the active rows."""
    out = F.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum")
    return out + sae.b_dec if bias else out
