"""saprmarks/dictionary_learning `.pt` state dicts (`ae.pt`, with the trainer's `config.json` beside it).
The class is told by its keys (the forward of each, as the library defines it):

- AutoEncoder {bias, encoder.*, decoder.weight [d, L]}: relu(encoder(x − bias)), decoded decoder(f) + bias;
- AutoEncoderNew {encoder.*, decoder.weight, decoder.bias}: relu(encoder(x)), decoded decoder(f) (+ its bias);
- JumpReluAutoEncoder {W_enc [d, L], b_enc, W_dec [L, d], b_dec, threshold}: relu(p·[p > θ]) with
  p = x W_enc + b_enc (b_dec not applied to the input), decoded f W_dec + b_dec;
- AutoEncoderTopK and BatchTopKSAE {encoder.*, decoder.weight, b_dec, k, threshold}: the same tensors, but the
  first keeps the k largest of relu(encoder(x − b_dec)) per token and the second (at inference) those above
  its global threshold. `config.json`'s dict_class says which; without it, `--k` asks for per-token TopK.
Gated autoencoders and anything else are refused. Only plain tensors are ever loaded (`weights_only=True`).
"""
from __future__ import annotations

import json
import os

import torch

from .common import ConvertError, Imported, fold_input_bias, matrices, read_pt, relu_threshold, tensor, vector

RELU = {"bias", "encoder.weight", "encoder.bias", "decoder.weight"}
RELU_NEW = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
JUMP = {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
TOPK = {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}
GATED = {"decoder_bias", "r_mag", "gate_bias", "mag_bias"}


def read(path: str, k: int | None = None) -> list[Imported]:
    sd = read_pt(path)
    keys = set(map(str, sd))
    name = os.path.splitext(os.path.basename(path))[0]
    if keys >= GATED:
        raise ConvertError(f"{path}: a GatedAutoEncoder: its gate and magnitude paths cannot be written as one "
                           "JumpReLU SAE exactly, so SafeDIG does not convert it")
    if keys in (RELU, RELU_NEW):
        L = tensor(path, sd, "encoder.bias", 1).shape[0]
        W_enc, W_dec = matrices(path, sd, ("encoder.weight", "Ld"), ("decoder.weight", "dL"), latent_bias="encoder.bias")
        d = W_enc.shape[1]
        b_enc = vector(path, sd, "encoder.bias", L, "one per latent")
        if keys == RELU:
            form, b_dec = "dictionary_learning AutoEncoder", vector(path, sd, "bias", d, "the activation width")
        else:
            form, b_dec = "dictionary_learning AutoEncoderNew", vector(path, sd, "decoder.bias", d, "the activation width")
            b_enc = fold_input_bias(W_enc, b_enc, b_dec)
        return [_no_k(Imported(name, form, W_enc, b_enc, W_dec, b_dec, "relu"), k, path)]
    if keys == JUMP:
        W_enc, W_dec = matrices(path, sd, ("W_enc", "dL"), ("W_dec", "Ld"), latent_bias="b_enc")
        L, d = W_enc.shape
        b_dec = vector(path, sd, "b_dec", d, "the activation width")
        b_enc = fold_input_bias(W_enc, vector(path, sd, "b_enc", L, "one per latent"), b_dec)
        th = relu_threshold(vector(path, sd, "threshold", L, "one per latent"))
        return [_no_k(Imported(name, "dictionary_learning JumpReluAutoEncoder", W_enc, b_enc, W_dec, b_dec,
                               "jumprelu", threshold=th), k, path)]
    if keys == TOPK:
        return [_topk(path, sd, name, k)]
    raise ConvertError(f"{path}: not a dictionary_learning AutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK or "
                       f"BatchTopKSAE state dict (keys: {', '.join(sorted(keys)) or 'none'})")


def _no_k(imp: Imported, k: int | None, path: str) -> Imported:
    if k is not None:
        raise ConvertError(f"{path}: --k applies to TopK SAEs, and this one is {imp.activation}")
    return imp


def _topk(path: str, sd: dict, name: str, k: int | None) -> Imported:
    W_enc, W_dec = matrices(path, sd, ("encoder.weight", "Ld"), ("decoder.weight", "dL"), latent_bias="encoder.bias")
    L, d = W_enc.shape
    b_enc = vector(path, sd, "encoder.bias", L, "one per latent")
    b_dec = vector(path, sd, "b_dec", d, "the activation width")
    cls = _dict_class(path)
    if k is not None or cls == "AutoEncoderTopK":
        k = k if k is not None else _k(path, sd)
        if not 0 < k <= L:
            raise ConvertError(f"{path}: k={k} must be in 1..{L} (the number of latents)")
        return Imported(name, "dictionary_learning AutoEncoderTopK", W_enc, b_enc, W_dec, b_dec, "topk", k=k)
    if cls == "BatchTopKSAE":
        th = tensor(path, sd, "threshold")
        if th.numel() != 1:
            raise ConvertError(f"{path}: tensor 'threshold' has shape {list(th.shape)}, expected one number")
        th = relu_threshold(th.reshape(1).expand(L).clone())  # relu(p)·[relu(p) > θ]
        return Imported(name, "dictionary_learning BatchTopKSAE", W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=th)
    where = os.path.join(os.path.dirname(path) or ".", "config.json")
    raise ConvertError(f"{path}: AutoEncoderTopK (per-token TopK) and BatchTopKSAE (a global threshold) store the "
                       f"same tensors and encode differently, and {where} "
                       f"{'names neither (dict_class ' + repr(cls) + ')' if cls else 'is missing'}; put the "
                       "trainer's config.json beside it, or pass --k K for per-token TopK")


def _k(path: str, sd: dict) -> int:
    k = sd["k"]
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        return int(k)
    raise ConvertError(f"{path}: 'k' must be one integer, got {k!r}")


def _dict_class(path: str) -> str | None:
    cfg = os.path.join(os.path.dirname(path) or ".", "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            trainer = json.load(f).get("trainer", {})
        return trainer.get("dict_class")
    except (OSError, ValueError, AttributeError):
        raise ConvertError(f"{cfg}: not a dictionary_learning config.json (expected {{\"trainer\": {{\"dict_class\": "
                           "...}}}})") from None
