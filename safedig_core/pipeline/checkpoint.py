"""Training checkpoints: one safetensors file holding the SAE, Adam's state, counters, the RNG state and the
config as JSON metadata (nothing is unpickled on resume), written atomically so a kill at any moment leaves the
previous or the new file."""
from __future__ import annotations

import json

import torch
from safetensors import safe_open
from torch import Tensor

from ..formats.atomic import write_safetensors
from ..sae import SparseAutoencoder
from .data import TrainError

CKPT_FORMAT = 1


CKPT_KEY = "safedig_train"


def atomic_save(tensors: dict[str, Tensor], meta: dict, path: str, key: str = CKPT_KEY) -> None:
    """safetensors file with JSON metadata under `key`, written to a temporary name, fsynced, renamed."""
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, {key: json.dumps(meta)})


def write_checkpoint(path, sae, opt, params, state: dict, meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in sae.state_dict().items()}
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{pid}.{name}"] = v if isinstance(v, Tensor) else torch.tensor(v)
    groups = []
    for g in sd["param_groups"]:
        g = dict(g)
        g["betas"] = list(g["betas"])
        groups.append(g)
    tensors.update({f"state.{k}": v for k, v in state.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and any(p.is_cuda for p in params):
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    atomic_save(tensors, {**meta, "format": CKPT_FORMAT, "param_groups": groups}, path)


def read_checkpoint(path: str) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of a training checkpoint; TrainError if it is not one."""
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(CKPT_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a dict
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own types for a malformed file
        raise TrainError(f"{path}: not a readable training checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if raw is None:
        raise TrainError(f"{path}: a safetensors file, but not a SafeDIG training checkpoint")
    meta = json.loads(raw)
    if meta.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta, tensors


def load_checkpoint_sae(path: str) -> SparseAutoencoder:
    """The SAE stored in a training checkpoint (e.g. to score or bundle a finished run)."""
    meta, t = read_checkpoint(path)
    sae = SparseAutoencoder(meta["d"], meta["config"]["latents"], meta["config"]["k"])
    sae.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
    return sae


def load_optimizer(opt, meta, tensors) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})
