"""Changes in ComfyUI after 0.3.75 that must not break the pack, each tested with a stand-in where the
installed ComfyUI lacks it."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.patches import TOKEN_LAYOUT, stream_span
from safedig_core.positions import parse

pytestmark = pytest.mark.comfy


@pytest.fixture
def required_txt_ids_dims(comfy, monkeypatch):
    """Newer ComfyUI: FluxParams and ChromaParams gain a required `txt_ids_dims`."""
    import comfy.ldm.chroma.model
    import comfy.ldm.flux.model

    for module, name in ((comfy.ldm.flux.model, "FluxParams"), (comfy.ldm.chroma.model, "ChromaParams")):
        base = getattr(module, name)
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(base)}:
            continue
        newer = dataclasses.make_dataclass(name, [("txt_ids_dims", list, dataclasses.field(kw_only=True))], bases=(base,))
        monkeypatch.setattr(module, name, newer)
    return comfy.ldm.flux.model.FluxParams


def test_stand_in_refuses_a_config_without_txt_ids_dims(required_txt_ids_dims):
    with pytest.raises(TypeError, match="txt_ids_dims"):
        required_txt_ids_dims(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=64, hidden_size=64,
                              mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14],
                              theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


@pytest.mark.parametrize("make, want", [(comfyui.tiny_flux, []), (comfyui.tiny_flux_schnell, []),
                                        (comfyui.tiny_chroma, []), (comfyui.tiny_flux2, [3])])
def test_tiny_builders_pass_txt_ids_dims_when_the_field_exists(required_txt_ids_dims, make, want):
    dm = make(seed=0).get_model_object("diffusion_model")
    assert dm.params.txt_ids_dims == want


def test_testbed_config_passes_txt_ids_dims_when_the_field_exists(required_txt_ids_dims):
    from safedig_core.testbed.model import build_model

    assert build_model(init=False).diffusion_model.params.txt_ids_dims == []


def test_the_installed_comfyui_gets_no_unknown_field(comfy):
    import comfy.ldm.flux.model

    has = "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    assert ("txt_ids_dims" in comfyui.params_compat({"image_model": "flux"})) == has


@pytest.mark.parametrize("kind", ["single", "double"])
def test_reference_tokens_stay_unsteered_under_newer_img_slice(kind):
    """Newer ComfyUI: `img_slice` ends after the reference-image tokens and `reference_image_num_tokens`
    appears. SafeDIG's own token layout (recorded by its wrapper from the output latent) still ends the
    image span at the output image."""
    txt, img, ref = 5, 16, 16
    to = {TOKEN_LAYOUT: (txt, img), "img_slice": [txt, txt + img + ref], "reference_image_num_tokens": [ref]}
    if kind == "single":
        out = {"img": torch.zeros(2, txt + img + ref, 8)}
        assert stream_span(parse("single.0.img"), out, to) == ("img", txt, txt + img)
        assert stream_span(parse("single.0.txt"), out, to) == ("img", 0, txt)
    else:
        out = {"img": torch.zeros(2, img + ref, 8), "txt": torch.zeros(2, txt, 8)}
        assert stream_span(parse("double.0.img"), out, to) == ("img", 0, img)
        assert stream_span(parse("double.0.txt"), out, to) == ("txt", 0, txt)


def _pack_api(comfy):
    import importlib

    module = comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"].__module__
    return importlib.import_module(module.rsplit(".", 1)[0] + ".api")


def test_the_node_api_of_the_installed_comfyui(comfy):
    import comfy_api.v0_0_2

    api = _pack_api(comfy)
    expected = "comfy_api.v0_0_3" if importlib.util.find_spec("comfy_api.v0_0_3") else "comfy_api.v0_0_2"
    assert expected == api.API_VERSION
    if expected.endswith("v0_0_2"):
        assert api.io is comfy_api.v0_0_2.io


def test_a_newer_comfyui_with_v0_0_3_is_preferred(comfy, monkeypatch):
    """Newer ComfyUI adds comfy_api.v0_0_3 (stand-in: a module with v0_0_2's io and ComfyExtension)."""
    import types

    import comfy_api.v0_0_2

    newer = types.ModuleType("comfy_api.v0_0_3")
    newer.io, newer.ComfyExtension = comfy_api.v0_0_2.io, comfy_api.v0_0_2.ComfyExtension
    monkeypatch.setitem(sys.modules, "comfy_api.v0_0_3", newer)
    name, module = _pack_api(comfy).load()
    assert (name, module) == ("comfy_api.v0_0_3", newer)


def test_no_known_node_api_is_one_clear_line(comfy):
    with pytest.raises(ImportError, match=r"^SafeDIG needs ComfyUI's node API \(comfy_api\.v9 or comfy_api\.v8\): update"):
        _pack_api(comfy).load(("comfy_api.v9", "comfy_api.v8"))
