"""SAE-Lens folders (`cfg.json` + `sae_weights.safetensors`, as `SAE.save_model` writes them), SAE-Lens 6 and
older configs. Semantics follow the installed sae_lens (6.x) inference classes:

- `standard`: relu((n(x) − b_dec·a) W_enc + b_enc), decoded as n⁻¹(z W_dec + b_dec), with a =
  apply_b_dec_to_input (when false, b_dec is folded into b_enc) and n the input normalisation;
- `topk`: TopK (then ReLU) of the same pre-activations; `rescale_acts_by_decoder_norm` (pre-activations times
  ‖W_dec_j‖, code divided by it before decoding) is folded into the weights;
- `jumprelu` (also how SAE-Lens saves BatchTopK SAEs for inference): relu(p)·[p > θ];
- normalize_activations: `none`; `layer_norm` and `constant_norm_rescale` (per token, kept as such);
  `expected_average_only_in` (a constant factor: folded into `scale` from the `activation_scaler.json`
  SAE-Lens writes beside a checkpoint). `covariance_whitening` and gated / transcoder / other architectures
  are refused.
Pre-6.0 configs (no `architecture`, `activation_fn` with `activation_fn_kwargs.k` for TopK, a boolean
`normalize_activations`) are read as SAE-Lens 6 reads them.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from .common import (
    ConvertError,
    Imported,
    fold_input_bias,
    matrices,
    no_extra,
    read_folders,
    read_safetensors,
    relu_threshold,
    tensor,
    vector,
)

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
NORMALIZE = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}
HINTS = {"gated": " (a gated SAE's gate and magnitude paths cannot be written as one JumpReLU exactly)",
         "transcoder": " (transcoders map one activation to another; SafeDIG steers with autoencoders)",
         "batchtopk": " (save it with save_inference_model: SAE-Lens writes BatchTopK SAEs as jumprelu)"}


def read(path: str, k: int | None = None) -> list[Imported]:
    return read_folders(path, CFG, _read_one, k, f"an SAE-Lens folder as SAE.save_model writes it: {CFG} + {WEIGHTS}")


def _config(folder: str) -> dict:
    path = os.path.join(folder, CFG)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    version = cfg.get("sae_lens_version") or _metadata(cfg).get("sae_lens_version")
    major = re.match(r"\d+", str(version or ""))
    if major is None or int(major.group()) < 6:
        cfg = _from_pre_6(cfg, path)
    return cfg


def _metadata(cfg: dict) -> dict:
    meta = cfg.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _from_pre_6(cfg: dict, path: str) -> dict:
    """The fields of a pre-6.0 config as SAE-Lens 6 reads them (`handle_pre_6_0_config`)."""
    cfg = dict(cfg)
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    if fn == "topk" and kwargs.get("k") is not None:
        cfg["architecture"], cfg["k"] = "topk", kwargs["k"]
    elif fn not in ("relu", "topk") and cfg["architecture"] == "standard":
        raise ConvertError(f"{path}: activation_fn {fn!r} is not supported (SafeDIG reads relu and topk)")
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    cfg.setdefault("hook_name", cfg.get("hook_point"))
    return cfg


def _int(cfg: dict, key: str, path: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConvertError(f"{path}: '{key}' must be a positive integer, got {v!r}")
    return v


def _read_one(folder: str, k_override: int | None) -> Imported:
    cfg = _config(folder)
    cfg_path, src = os.path.join(folder, CFG), os.path.join(folder, WEIGHTS)
    arch = cfg.get("architecture")
    if arch not in ("standard", "topk", "jumprelu"):
        hint = next((h for key, h in HINTS.items() if key in str(arch)), "")
        raise ConvertError(f"{cfg_path}: architecture {arch!r} is not supported; SafeDIG converts standard, topk "
                           f"and jumprelu SAE-Lens SAEs{hint}")
    d, L = _int(cfg, "d_in", cfg_path), _int(cfg, "d_sae", cfg_path)
    t = read_safetensors(src)
    if "scaling_factor" in t:
        if not torch.equal(tensor(src, t, "scaling_factor"), torch.ones_like(t["scaling_factor"])):
            raise ConvertError(f"{src}: a finetuning scaling factor other than 1 is not supported")
        del t["scaling_factor"]
    keys = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    no_extra(src, t, keys, f"an SAE-Lens {arch} SAE")
    W_enc, W_dec = matrices(src, t, ("W_enc", "dL"), ("W_dec", "Ld"), d, L)
    b_enc = vector(src, t, "b_enc", L, "one per latent, d_sae")
    b_dec = vector(src, t, "b_dec", d, "the input width, d_in")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = fold_input_bias(W_enc, b_enc, b_dec)
    normalize, scale = _normalization(cfg, folder)
    hook = cfg.get("hook_name") or _metadata(cfg).get("hook_name") or os.path.basename(folder)
    base = dict(hookpoint=str(hook), form=f"sae_lens {arch}", W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec,
                normalize=normalize, scale=scale)
    if arch == "jumprelu":
        th = relu_threshold(vector(src, t, "threshold", L, "one per latent, d_sae"))
        return _override_k(Imported(**base, activation="jumprelu", threshold=th), k_override, cfg_path)
    if arch == "standard":
        return _override_k(Imported(**base, activation="relu"), k_override, cfg_path)
    k = k_override or _int(cfg, "k", cfg_path)
    if k > L:
        raise ConvertError(f"{cfg_path}: k={k} exceeds the {L} latents")
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.double().norm(dim=1)
        base.update(W_enc=(W_enc.double() * norms[:, None]).float(), b_enc=(b_enc.double() * norms).float(),
                    W_dec=(W_dec.double() / norms[:, None]).float())
    return Imported(**base, activation="topk", k=k)


def _override_k(imp: Imported, k: int | None, path: str) -> Imported:
    if k is not None:
        raise ConvertError(f"{path}: --k applies to TopK SAEs, and this one is {imp.activation}")
    return imp


def _normalization(cfg: dict, folder: str) -> tuple[str, float]:
    mode = cfg.get("normalize_activations", "none")
    if mode in NORMALIZE:
        return NORMALIZE[mode], 1.0
    path = os.path.join(folder, CFG)
    if mode == "expected_average_only_in":
        scaler = os.path.join(folder, SCALER)
        factor = None
        if os.path.isfile(scaler):
            try:
                with open(scaler) as f:
                    factor = json.load(f).get("scaling_factor")
            except (OSError, ValueError, AttributeError):
                factor = None
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0:
            return "none", float(factor)
        raise ConvertError(f"{path}: normalize_activations is 'expected_average_only_in' but no {SCALER} with a "
                           "positive scaling_factor is beside it; fold the factor in with SAE-Lens "
                           "(sae.fold_activation_norm_scaling_factor) and save again")
    if mode == "covariance_whitening":
        raise ConvertError(f"{path}: normalize_activations 'covariance_whitening' is not supported; fold the "
                           "whitening in with SAE-Lens (sae.fold_activation_whitening) and save again")
    raise ConvertError(f"{path}: unknown normalize_activations {mode!r}")
