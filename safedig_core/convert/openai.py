"""OpenAI sparse_autoencoder `.pt` state dicts (`Autoencoder.state_dict()`): `pre_bias` [d], `encoder.weight`
[L, d], `latent_bias` [L], `decoder.weight` [d, L], statistics buffers, and `activation` "ReLU" or "TopK" with
`activation_state_dict` {k, postact_fn}. As in their `Autoencoder.from_state_dict`, TopK autoencoders
layer-normalise the input, (x − mean) / (std + 1e-5), and undo it on the output (y·std + mean): SafeDIG keeps
that as the SAE's `layer_norm` input normalisation. latents = act(encoder(x − pre_bias) + latent_bias).
"""
from __future__ import annotations

import os

from .common import ConvertError, Imported, matrices, no_extra, read_pt, vector

WEIGHTS = {"pre_bias", "encoder.weight", "latent_bias", "decoder.weight"}
OTHER = {"stats_last_nonzero", "latents_activation_frequency", "latents_mean_square", "activation",
         "activation_state_dict"}


def read(path: str, k: int | None = None) -> list[Imported]:
    sd = read_pt(path)
    no_extra(path, sd, WEIGHTS | OTHER, "an OpenAI sparse_autoencoder Autoencoder")
    W_enc, W_dec = matrices(path, sd, ("encoder.weight", "Ld"), ("decoder.weight", "dL"), latent_bias="latent_bias")
    L, d = W_enc.shape
    b_enc = vector(path, sd, "latent_bias", L, "one per latent")
    b_dec = vector(path, sd, "pre_bias", d, "the activation width")
    name = os.path.splitext(os.path.basename(path))[0]
    act = sd.get("activation", "ReLU")
    if act == "ReLU":
        if k is not None:
            raise ConvertError(f"{path}: --k applies to TopK SAEs, and this one is ReLU")
        return [Imported(name, "openai ReLU", W_enc, b_enc, W_dec, b_dec, "relu")]
    if act != "TopK":
        raise ConvertError(f"{path}: activation {act!r} is not supported (SafeDIG reads ReLU and TopK)")
    state = sd.get("activation_state_dict")
    if not isinstance(state, dict) or isinstance(state.get("k"), bool) or not isinstance(state.get("k"), int):
        raise ConvertError(f"{path}: a TopK autoencoder needs 'activation_state_dict' with an integer 'k'")
    if state.get("postact_fn", "ReLU") != "ReLU":
        raise ConvertError(f"{path}: TopK with postact_fn {state['postact_fn']!r} is not supported (SafeDIG's TopK "
                           "applies ReLU to the kept values)")
    k = k if k is not None else state["k"]
    if not 0 < k <= L:
        raise ConvertError(f"{path}: k={k} must be in 1..{L} (the number of latents)")
    return [Imported(name, "openai TopK", W_enc, b_enc, W_dec, b_dec, "topk", k=k, normalize="layer_norm")]
