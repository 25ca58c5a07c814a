"""EleutherAI sparsify folders: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors` (as
`SparseCoder.save_to_disk` writes them), one SAE or a folder of hookpoints.

sparsify encodes z = TopK(relu(encoder(x − b_dec))) and decodes z W_dec + b_dec, with `encoder.weight`
and `W_dec` both [L, d]: ReLU before TopK gives the same dense code as SafeDIG's TopK then ReLU. Transcoders
(no b_dec on the input, a different target), skip connections (`W_skip`) and the groupmax activation are
refused.
"""
from __future__ import annotations

import json
import os

from .common import ConvertError, Imported, matrices, no_extra, read_folders, read_safetensors, vector

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def read(path: str, k: int | None = None) -> list[Imported]:
    return read_folders(path, CFG, _read_one, k, f"a sparsify folder: <hookpoint>/{CFG} + {WEIGHTS}")


def _read_one(folder: str, k_override: int | None) -> Imported:
    cfg_path, src = os.path.join(folder, CFG), os.path.join(folder, WEIGHTS)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise ConvertError(f"{cfg_path}: expected a JSON object")
    if cfg.get("transcode"):
        raise ConvertError(f"{cfg_path}: a transcoder (transcode=true) predicts another activation than it reads; "
                           "SafeDIG steers with autoencoders")
    if cfg.get("skip_connection"):
        raise ConvertError(f"{cfg_path}: skip connections (W_skip) cannot be represented by a SafeDIG SAE")
    if cfg.get("activation", "topk") != "topk":
        raise ConvertError(f"{cfg_path}: activation {cfg.get('activation')!r} is not supported (SafeDIG reads topk)")
    d = cfg.get("d_in")
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ConvertError(f"{cfg_path}: 'd_in' must be a positive integer, got {d!r}")
    L = cfg.get("num_latents") or d * cfg.get("expansion_factor", 32)
    k = k_override or cfg.get("k", 32)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= L:
        raise ConvertError(f"{cfg_path}: k={k!r} must be an integer in 1..{L} (the number of latents)")
    t = read_safetensors(src)
    if "W_skip" in t:
        raise ConvertError(f"{src}: has a skip connection (W_skip), which a SafeDIG SAE cannot represent")
    no_extra(src, t, {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}, "a sparsify SparseCoder")
    W_enc, W_dec = matrices(src, t, ("encoder.weight", "Ld"), ("W_dec", "Ld"), d, L)
    return Imported(hookpoint=os.path.basename(os.path.normpath(folder)), form="sparsify topk",
                    W_enc=W_enc, b_enc=vector(src, t, "encoder.bias", L, "one per latent"), W_dec=W_dec,
                    b_dec=vector(src, t, "b_dec", d, "the input width, d_in"), activation="topk", k=k)
