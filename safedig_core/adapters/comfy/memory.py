"""The steering SAEs' device memory, known to ComfyUI's model management.

Steering keeps each steered position's encoder side (W_enc, b_enc, b_dec: `PositionSteerer.hold`) on the
device the model runs on; at FLUX width and 16x that is about 0.3 GB per position in bf16. Memory ComfyUI
cannot see is memory it does not free before loading a model, so a full GPU runs out. Here those working
copies become one `torch.nn.Module` wrapped in its own `ModelPatcher` (load device and offload device those
of the steered model), attached to the steered clone with `ModelPatcher.set_additional_models`. Sampling
(`comfy.sampler_helpers.prepare_sampling`) hands a model's additional models to `load_models_gpu` together
with the model: ComfyUI then counts their bytes (`model_size`, `loaded_size`), frees room for them, loads
them to the GPU and offloads them under pressure like any model, and steering computes with the copies
wherever they lie (a step run while ComfyUI holds them elsewhere, which sampling does not do, would make an
uncounted copy on the device). The rows the fast gate's first screens keep (`fast_gate.Screen`, a few percent of the encoder; its
last screen gathers rows only while it runs) and the harmful decoder rows stay outside the count.
"""
from __future__ import annotations

import weakref

import torch

KEY = "safedig_steering"  # the additional-models key on the steered ModelPatcher

_held: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> {(positions, dtype): ModelPatcher}


class SteeringWeights(torch.nn.Module):
    """The working copies of some positions' SAEs (encoder side), one submodule per position."""

    def __init__(self, saes: dict):
        super().__init__()
        for name, sae in saes.items():
            self.add_module(name.replace(".", "_"), sae)


class _Encoder(torch.nn.Module):
    """The encoder side of master weights that steering uses as they are (CPU in their own dtype): counted,
    never copied (nothing moves them: the load device is the CPU)."""

    def __init__(self, sae):
        super().__init__()
        self.W_enc, self.b_enc, self.b_dec = sae.W_enc, sae.b_enc, sae.b_dec


def _working(steerer, model, dtype):
    if model.load_device.type == "cpu" and steerer.sae.W_enc.device.type == "cpu" and steerer.sae.W_enc.dtype == dtype:
        return _Encoder(steerer.sae)
    return steerer.hold(model.offload_device, dtype)


def compute_dtype(model) -> torch.dtype:
    """The dtype the blocks' activations come in (the manual-cast dtype where ComfyUI casts weights on the fly)."""
    return getattr(model.model, "manual_cast_dtype", None) or model.model_dtype()


def weights_patcher(model, store, positions):
    """The ModelPatcher of the working copies that steering `positions` through `store` keeps on `model`'s
    device (one per store, positions and dtype, shared by every clone)."""
    import comfy.model_patcher

    dtype = compute_dtype(model)
    key = (tuple(sorted(map(str, positions))), dtype)
    per_store = _held.setdefault(store, {})
    if key not in per_store:
        saes = {str(p): _working(store.steerers[p], model, dtype) for p in sorted(positions)}
        per_store[key] = comfy.model_patcher.ModelPatcher(SteeringWeights(saes), load_device=model.load_device,
                                                          offload_device=model.offload_device)
    return per_store[key]


def track(model, store, positions) -> None:
    """Attach the working copies to ModelPatcher `model` (a clone this installation owns) as an additional model,
    so ComfyUI loads, offloads and counts them with it. Stores without SAE weights (baselines) are skipped."""
    from ...steering import PositionSteerer

    positions = [p for p in positions if isinstance(store.steerers.get(p), PositionSteerer)]
    if positions:  # one key per store: chained Apply Steering nodes each keep theirs
        model.set_additional_models(f"{KEY}.{id(store)}", [weights_patcher(model, store, positions)])


def steering_bytes(model) -> int:
    """Bytes of steering weights ComfyUI counts with `model` (0: none attached)."""
    return sum(m.model_size() for k, ms in model.additional_models.items() if k.startswith(KEY) for m in ms)
