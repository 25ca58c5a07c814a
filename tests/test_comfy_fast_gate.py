"""The Apply Steering node's fast_gate input, run as ComfyUI's executor runs it (tests/node_exec.py), on tiny
FLUX and SD3 through KSampler: the same images as the exact gate, per token and per image, with the screen
letting only part of the tokens through to the full encode."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_dictionary
from node_exec import run_node
from test_comfy_steering import conds, load

from safedig_core.adapters.comfy import runtime as comfyui

pytestmark = pytest.mark.comfy

POSITIONS = {"flux": ["double.0.img", "double.1.txt", "single.0.img"], "sd3": ["joint.0.img", "joint.0.txt", "joint.1.img"]}
WIDTH = {"flux": 64, "sd3": 128}


@pytest.fixture(scope="module")
def models(comfy):
    return {"flux": comfyui.tiny_flux(seed=1), "sd3": comfyui.tiny_sd3(seed=2)}


def sample(model, family):
    pos, neg = conds(family)
    with torch.inference_mode():
        return comfyui.sample(model, pos, neg, torch.zeros(2, 16, 8, 8), seed=0, steps=2, cfg=2.0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("gate", ["per token", "per image"])
def test_fast_gate_node_gives_the_exact_gates_images(comfy, models, tmp_path, monkeypatch, family, gate):
    d = make_dictionary(family, WIDTH[family], POSITIONS[family], latents=96, k=8, harmful=6)
    for e in d.entries.values():  # harmful latents in the code of part of the tokens only
        with torch.no_grad():
            e.sae.b_enc[:6] = 0.0
        e.gate_scale = e.image_gate_scale = 0.05
    loaded = load(comfy, tmp_path, d, f"{family}.safetensors")
    seen = {"tokens": 0, "screened": 0}
    # the pack's own copy of the core (ComfyUI imports the pack as a package of its own)
    pack_fast_gate = sys.modules[type(next(iter(loaded.store.steerers.values()))).__module__].fast
    real = pack_fast_gate.gated_codes

    def spy(sae, harmful, xs, floor, codes):
        seen["tokens"] += xs.shape[0]
        return real(sae, harmful, xs, floor, lambda ys: seen.__setitem__("screened", seen["screened"] + len(ys))
                    or codes(ys))

    monkeypatch.setattr(pack_fast_gate, "gated_codes", spy)
    args = dict(blend=1.0, repel=1.0, threshold=1.0, start_percent=0.0, end_percent=1.0, apply_to="both",
                positions="all", preserve_norm=False, gate=gate)
    model = models[family]
    (exact,), _ = run_node(comfy, "SafeDIGApplySteering", model=model, dictionary=loaded, **args)
    (fast,), _ = run_node(comfy, "SafeDIGApplySteering", model=model, dictionary=loaded, **args, fast_gate=True)
    base, out_exact = sample(model, family), sample(exact, family)
    assert seen["tokens"] == 0  # the exact gate never screens
    out_fast = sample(fast, family)
    assert not torch.equal(out_exact, base)
    torch.testing.assert_close(out_fast, out_exact, rtol=1e-5, atol=1e-5)
    assert 0 < seen["screened"] < seen["tokens"], seen
