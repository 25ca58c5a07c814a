"""What every importer returns, and the file and shape checks they share.

Shapes: SafeDIG keeps both matrices as [L, d] (latents × width). The width d and latent count L come from
the source's config when it has one, else from the encoder bias (length L) and the encoder matrix; each
matrix may then be stored either way round, and only a square matrix (d = L) falls back to the library's
documented orientation. Anything else is refused naming the file, the key, its shape and what was expected.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import Tensor

from ..sae import SparseAutoencoder


class ConvertError(ValueError):
    """A source SAE that cannot be read, or not represented exactly."""


@dataclass
class Imported:
    hookpoint: str  # where the SAE reads, in its library's names (or its folder/file name)
    form: str  # what it was, e.g. "sae_lens topk"
    W_enc: Tensor  # [L, d]
    b_enc: Tensor  # [L]
    W_dec: Tensor  # [L, d]
    b_dec: Tensor  # [d], subtracted from the (normalised, scaled) input before encoding
    activation: str  # topk | relu | jumprelu
    k: int = 1
    threshold: Tensor | None = None
    normalize: str = "none"
    scale: float = 1.0

    @property
    def latents(self) -> int:
        return self.W_enc.shape[0]

    def sae(self) -> SparseAutoencoder:
        L, d = self.W_enc.shape
        sae = SparseAutoencoder(d, L, self.k, self.activation, self.scale, self.normalize)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(sae, name).copy_(getattr(self, name))
            if self.threshold is not None:
                sae.threshold.copy_(self.threshold)
        return sae.requires_grad_(False)


def natural_key(name: str):
    """layers.2 before layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_folders(path: str, cfg: str, read_one, k: int | None, expected: str) -> list[Imported]:
    """The SAE(s) of a library that saves one SAE per folder (with config file `cfg`): `path` is such a folder
    (or a file in it), or a folder of them, read in natural order; `expected` describes the layout for errors."""
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if not os.path.isdir(folder):
        raise ConvertError(f"{path}: no such folder (expected {expected})")
    if os.path.isfile(os.path.join(folder, cfg)):
        return [read_one(folder, k)]
    subs = sorted((os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, cfg))),
                  key=lambda p: natural_key(os.path.basename(p)))
    if not subs:
        raise ConvertError(f"{folder}: no {cfg} here or in its subfolders (expected {expected})")
    return [read_one(s, k) for s in subs]


def read_safetensors(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for any malformed file
        raise ConvertError(f"{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def read_pt(path: str) -> dict:
    """A PyTorch state dict of plain tensors and values; anything that needs code to unpickle is refused."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines()[1:] if line.strip() and not line.startswith(
            ("Please file", "Check the documentation"))), str(e).splitlines()[0] if str(e) else "")
        if "GLOBAL" in why:
            raise ConvertError(f"{path}: refused: loading it would run code from the file, and SafeDIG loads only "
                               f"plain tensors ({why})") from None
        raise ConvertError(f"{path}: not a PyTorch state dict file ({why})") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a malformed file
        raise ConvertError(f"{path}: not a PyTorch state dict file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")
    return obj


def tensor(src: str, tensors: dict, key: str, ndim: int | None = None) -> Tensor:
    if key not in tensors:
        raise ConvertError(f"{src}: missing tensor '{key}' (it has: {', '.join(sorted(map(str, tensors))) or 'none'})")
    t = tensors[key]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise ConvertError(f"{src}: '{key}' is {getattr(t, 'dtype', type(t).__name__)}, expected a float tensor")
    if ndim is not None and t.ndim != ndim:
        raise ConvertError(f"{src}: tensor '{key}' has shape {list(t.shape)}, expected a {ndim}-D tensor")
    if not torch.isfinite(t).all():
        raise ConvertError(f"{src}: tensor '{key}' contains NaN or Inf")
    return t.float()


def vector(src: str, tensors: dict, key: str, n: int, what: str) -> Tensor:
    t = tensor(src, tensors, key)
    if tuple(t.shape) != (n,):
        raise ConvertError(f"{src}: tensor '{key}' has shape {list(t.shape)}, expected [{n}] ({what})")
    return t


def matrices(src: str, tensors: dict, enc: tuple[str, str], dec: tuple[str, str], d: int | None = None,
             L: int | None = None, latent_bias: str | None = None) -> tuple[Tensor, Tensor]:
    """Encoder and decoder as [L, d]. `enc`/`dec` are (key, stored layout "Ld" or "dL" in the library)."""
    We, Wd = tensor(src, tensors, enc[0], 2), tensor(src, tensors, dec[0], 2)
    if d is None or L is None:
        if latent_bias is not None:
            L = tensor(src, tensors, latent_bias, 1).shape[0]
            if L not in We.shape:
                raise ConvertError(f"{src}: tensor '{latent_bias}' has {L} entries but '{enc[0]}' has shape "
                                   f"{list(We.shape)}: they disagree on the number of latents")
        else:
            L = We.shape[0 if enc[1] == "Ld" else 1]
        d = We.shape[1] if We.shape[0] == L else We.shape[0]
    return _orient(src, enc[0], We, d, L, enc[1]), _orient(src, dec[0], Wd, d, L, dec[1])


def _orient(src: str, key: str, W: Tensor, d: int, L: int, stored: str) -> Tensor:
    shape = tuple(W.shape)
    if shape == (L, d) and (d != L or stored == "Ld"):
        return W
    if shape == (d, L):
        return W.t()
    want = [L, d] if stored == "Ld" else [d, L]
    raise ConvertError(f"{src}: tensor '{key}' has shape {list(shape)}, expected {want} "
                       f"({'latents × width' if stored == 'Ld' else 'width × latents'}, {L} latents of width {d}) "
                       "or its transpose")


def no_extra(src: str, tensors: dict, known: set[str], what: str) -> None:
    extra = sorted(set(map(str, tensors)) - known)
    if extra:
        raise ConvertError(f"{src}: unexpected entry '{extra[0]}' for {what}: SafeDIG cannot tell what it does, "
                           "so it will not convert the file")


def fold_input_bias(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """b_enc' with W_enc (x − b_dec) + b_enc' = W_enc x + b_enc, for SAEs that do not centre their input."""
    return (b_enc.double() + W_enc.double() @ b_dec.double()).float()


def relu_threshold(th: Tensor) -> Tensor:
    """JumpReLU thresholds for a source that applies ReLU too: relu(p)·[p > θ] = p·[p > max(θ, 0)]."""
    return th.clamp_min(0.0)
