"""The sparse autoencoder of one position: encoder, decoder, activation function and scale.

Activations are multiplied by `scale` before encoding (chosen in training so that E‖x·scale‖² = d)
and divided by it after decoding, so callers always speak in the model's own units.
`z = act(W_enc (x·s − b_dec) + b_enc)`, `x̂ = (W_decᵀ z + b_dec) / s`, with `act` one of TopK
(ReLU then keep the k largest), ReLU, or JumpReLU (per-latent thresholds), the last two so that
SAEs from other libraries encode exactly as they did there.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

ACTIVATIONS = ("topk", "relu", "jumprelu")


class SparseAutoencoder(nn.Module):
    def __init__(self, d: int, latents: int, k: int = 32, activation: str = "topk", scale: float = 1.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if activation == "topk" and not 0 < k <= latents:
            raise ValueError(f"k={k} must be in 1..{latents} (the number of latents)")
        self.d, self.latents, self.k, self.activation = d, latents, k, activation
        self.W_enc = nn.Parameter(torch.zeros(latents, d))
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.W_dec = nn.Parameter(torch.zeros(latents, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("threshold", torch.zeros(latents))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def init_random(cls, d: int, latents: int, k: int = 32, scale: float = 1.0, generator=None):
        """Unit-norm random decoder rows, encoder initialised as the decoder's transpose."""
        sae = cls(d, latents, k, "topk", scale)
        w = torch.randn(latents, d, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            sae.W_dec.copy_(w)
            sae.W_enc.copy_(w)
        return sae

    def pre_acts(self, xs: Tensor, rows: Tensor | None = None) -> Tensor:
        """Pre-activations of scaled inputs `xs` [N, d]; only latents `rows` when given."""
        W = self.W_enc if rows is None else self.W_enc[rows]
        b = self.b_enc if rows is None else self.b_enc[rows]
        return torch.addmm(b, xs - self.b_dec, W.t())

    def encode_sparse(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """TopK code of scaled inputs as (values [N, k], indices [N, k]); values are ≥ 0."""
        vals, idx = self.pre_acts(xs).topk(self.k, dim=-1, sorted=False)
        return vals.relu(), idx

    def encode(self, x: Tensor) -> Tensor:
        """Dense code [N, latents] of unscaled inputs."""
        xs = x * self.scale
        if self.activation == "topk":
            vals, idx = self.encode_sparse(xs)
            return torch.zeros(xs.shape[0], self.latents, dtype=xs.dtype, device=xs.device).scatter_(1, idx, vals)
        return self.activate(self.pre_acts(xs))

    def activate(self, pre: Tensor, rows: Tensor | None = None) -> Tensor:
        """ReLU / JumpReLU of pre-activations (not TopK, which needs all latents at once)."""
        if self.activation == "jumprelu":
            th = self.threshold if rows is None else self.threshold[rows]
            return pre * (pre > th)
        return pre.relu()

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled reconstruction from a dense code."""
        return torch.addmm(self.b_dec, z, self.W_dec) / self.scale

    def decode_sparse(self, vals: Tensor, idx: Tensor) -> Tensor:
        """Unscaled reconstruction from a TopK code, touching only the k active decoder rows."""
        out = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec) / self.scale

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "topk":
            vals, idx = self.encode_sparse(x * self.scale)
            return self.decode_sparse(vals, idx)
        return self.decode(self.encode(x))
