"""The sparse autoencoder of one position: encoder, decoder, activation function and input map.

Activations are multiplied by `scale` before encoding (chosen in training so that E‖x·scale‖² = d)
and divided by it after decoding, so callers always speak in the model's own units.
`z = act(W_enc (x·s − b_dec) + b_enc)`, `x̂ = (W_decᵀ z + b_dec) / s`, with `act` one of TopK
(ReLU then keep the k largest), ReLU, or JumpReLU (per-latent thresholds), the last two so that
SAEs from other libraries encode exactly as they did there. For the same reason an SAE may normalise
each token before encoding (`normalize`): `layer_norm` (x − mean) / (std + 1e-5), undone on the output
as y·std + mean (OpenAI's TopK SAEs, SAE-Lens `layer_norm`), or `constant_norm_rescale` x·√d/‖x‖,
undone as y·‖x‖/√d (SAE-Lens). Undoing it needs the statistics of the token the code came from, so
`decode` then takes that token too.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS = ("topk", "relu", "jumprelu")
NORMALIZATIONS = ("none", "layer_norm", "constant_norm_rescale")
LN_EPS = 1e-5


class SparseAutoencoder(nn.Module):
    def __init__(self, d: int, latents: int, k: int = 32, activation: str = "topk", scale: float = 1.0,
                 normalize: str = "none"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        if activation == "topk" and not 0 < k <= latents:
            raise ValueError(f"k={k} must be in 1..{latents} (the number of latents)")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown input normalisation {normalize!r}: use one of {', '.join(NORMALIZATIONS)}")
        self.d, self.latents, self.k, self.activation, self.normalize = d, latents, k, activation, normalize
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

    def prepare(self, x: Tensor) -> Tensor:
        """Inputs [N, d] in model units as the encoder takes them: normalised per token if the SAE asks for
        it, times `scale` (the "scaled inputs" of the methods below)."""
        if self.normalize == "none":
            return x * self.scale
        xf = x.float()
        if self.normalize == "layer_norm":
            c = xf - xf.mean(-1, keepdim=True)
            xn = c / (c.std(-1, keepdim=True) + LN_EPS)
        else:
            xn = xf * self._rescale(xf)
        return xn.to(x.dtype) * self.scale

    def _rescale(self, xf: Tensor) -> Tensor:
        """constant_norm_rescale's per-token factor √d/‖x‖ (a zero token stays zero instead of NaN)."""
        return math.sqrt(self.d) / xf.norm(dim=-1, keepdim=True).clamp_min(1e-30)

    def _spread(self, xf: Tensor) -> Tensor:
        """Per-token factor [N, 1] that takes the encoder's normalised space back to model units."""
        if self.normalize == "layer_norm":
            return (xf - xf.mean(-1, keepdim=True)).std(-1, keepdim=True)
        return 1 / self._rescale(xf)

    def restore(self, y: Tensor, x: Tensor | None = None) -> Tensor:
        """A reconstruction y in the encoder's space back in model units; `x` are the inputs it came from
        (needed only when the SAE normalises its inputs)."""
        y = y / self.scale
        if self.normalize == "none":
            return y
        if x is None:
            raise ValueError(f"this SAE normalises its inputs ({self.normalize}): decoding needs the inputs "
                             "the code was computed from")
        xf = x.float()
        mean = xf.mean(-1, keepdim=True) if self.normalize == "layer_norm" else 0.0
        return (y.float() * self._spread(xf) + mean).to(y.dtype)

    def shift_to_input(self, delta: Tensor, x: Tensor) -> Tensor:
        """A shift `delta` of tokens x [N, d] in the encoder's space, in model units, through the decoder's
        map (so steering along decoder rows moves x as the decoded output would move)."""
        if self.normalize == "none":
            return delta / self.scale.float()
        return delta * (self._spread(x.float()) / self.scale.float())

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
        xs = self.prepare(x)
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

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """Unscaled reconstruction from a dense code (of inputs `x`, needed when the SAE normalises them)."""
        return self.restore(torch.addmm(self.b_dec, z, self.W_dec), x)

    def decode_sparse(self, vals: Tensor, idx: Tensor, x: Tensor | None = None) -> Tensor:
        """Unscaled reconstruction from a TopK code, touching only the k active decoder rows."""
        out = nn.functional.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return self.restore(out + self.b_dec, x)

    def forward(self, x: Tensor) -> Tensor:
        if self.activation == "topk":
            vals, idx = self.encode_sparse(self.prepare(x))
            return self.decode_sparse(vals, idx, x)
        return self.decode(self.encode(x), x)
