"""The SAE weights steering keeps on the device are known to ComfyUI's model management
(`adapters/comfy/memory.py`): after a real KSampler run, ComfyUI's own list of loaded models holds them, with
their bytes in its size and loaded-size counts, beside the model they steer."""
from __future__ import annotations

import pytest
import torch
from conftest import make_dictionary

from safedig_core.adapters.comfy import memory
from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.patches import SharedSteerers
from safedig_core.positions import parse
from safedig_core.steering import PositionSteerer, SteeringConfig

pytestmark = pytest.mark.comfy

POSITIONS = ["double.0.img", "double.1.txt", "single.1.img"]
STEER = SteeringConfig(blend=1.0, repel=1.0)


def encoder_bytes(d, positions, dtype_size=4):
    return sum((e.sae.W_enc.numel() + e.sae.b_enc.numel() + e.sae.b_dec.numel()) * dtype_size
               for p, e in d.entries.items() if str(p) in positions)


def store_of(d):
    return SharedSteerers({p: e.steerer() for p, e in d.entries.items()})


def sample(model):
    from test_comfy_steering import conds

    pos, neg = conds("flux")
    with torch.inference_mode():
        return comfyui.sample(model, pos, neg, torch.zeros(1, 16, 8, 8), seed=0, steps=2, cfg=2.0)


def loaded_steering():
    """ComfyUI's bookkeeping of the steering weights it holds now: [(model_memory, loaded_memory)]."""
    import comfy.model_management as mm

    return [(lm.model_memory(), lm.model_loaded_memory()) for lm in mm.current_loaded_models
            if lm.model is not None and isinstance(lm.model.model, memory.SteeringWeights)]


def test_comfyui_counts_and_loads_the_steering_weights(comfy):
    model = comfyui.tiny_flux(seed=1)
    d = make_dictionary("flux", 64, POSITIONS, latents=96)
    chosen = [parse(p) for p in POSITIONS[:2]]
    steered = comfyui.steer_model(model, store_of(d), chosen, STEER)
    want = encoder_bytes(d, POSITIONS[:2])
    assert memory.steering_bytes(steered) == want and memory.steering_bytes(model) == 0
    assert memory.steering_bytes(comfyui.steer_model(model, store_of(d), chosen, SteeringConfig())) == 0  # identity
    assert memory.steering_bytes(steered.clone()) == want  # clones keep it, as ModelPatcher.clone copies it
    sample(steered)
    assert (want, want) in loaded_steering()  # loaded with the model it steers, at its full size

    # a second Apply Steering on top, with another dictionary: both counted
    d2 = make_dictionary("flux", 64, POSITIONS, latents=48, seed=3)
    twice = comfyui.steer_model(steered, store_of(d2), [parse(POSITIONS[2])], STEER)
    assert memory.steering_bytes(twice) == want + encoder_bytes(d2, POSITIONS[2:])
    sample(twice)
    assert {(want, want), (encoder_bytes(d2, POSITIONS[2:]),) * 2} <= set(loaded_steering())


def test_held_copy_is_what_steering_uses():
    """A copy in another dtype (a GPU model's bf16): ComfyUI counts its bytes in that dtype, and steering computes
    with that very module, giving what it gives without one."""
    import comfy.model_patcher

    d = make_dictionary("flux", 64, POSITIONS[:1], latents=96)
    entry = next(iter(d.entries.values()))
    x = torch.randn(2, 10, 64).to(torch.bfloat16)
    plain = entry.steerer().steer(x, STEER)
    st = entry.steerer()
    held = st.hold("cpu", torch.bfloat16)
    assert held is not st.sae and held.W_dec.numel() == 0
    patcher = comfy.model_patcher.ModelPatcher(memory.SteeringWeights({"p": held}), load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    assert patcher.model_size() == (96 * 64 + 96 + 64 + 96 + 1) * 2  # W_enc, b_enc, b_dec, thresholds, scale
    assert torch.equal(st.steer(x, STEER), plain)
    assert st._derived(torch.device("cpu"), torch.bfloat16)[0] is held
    with torch.no_grad():  # prove it is used: a change to the held copy changes what steering computes
        held.W_enc.zero_()
        held.b_enc.fill_(-1.0)
    assert torch.equal(st.steer(x, STEER), x)
    assert isinstance(st, PositionSteerer)
    # the manager moves the module in place (here to another dtype, as it would to another device): steering
    # follows it there rather than making a second copy
    patcher.model.to(torch.float64)
    assert torch.equal(st.steer(x.double(), STEER), x.double())
    assert st._derived(torch.device("cpu"), torch.float64)[0] is held
