"""Collection for every family in the real ComfyUI: the latent of one image comes from the model's latent
format (Flux.2 downsamples 16x, HunyuanImage 2.1 32x; Qwen-Image and Wan latents are 5-D), and the SafeDIG
Collect Activations node records a tiny Flux.2 at the token counts its latent gives."""
from __future__ import annotations

import pytest
from node_exec import FakeClip
from test_families import MODELS

from safedig_core.adapters.comfy.families import latent_shape
from safedig_core.formats.store import ActivationStore

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def models(comfy):
    return {name: spec[0](seed=3) for name, spec in MODELS.items()}


@pytest.mark.parametrize("name, want", [
    ("flux", (16, 8, 8)), ("chroma", (16, 8, 8)), ("flux2", (128, 4, 4)), ("qwen_image", (16, 1, 8, 8)),
    ("wan", (16, 1, 8, 8)), ("hunyuan_image", (64, 2, 2)), ("lumina2", (16, 8, 8)), ("lumina2-z_image", (16, 8, 8)), ("hidream", (16, 8, 8)),
])
def test_latent_shape_of_a_64px_image(models, name, want):
    assert latent_shape(models[name], 64, 64) == want


def test_a_latent_format_that_names_its_downscale_is_followed(models):
    """Newer ComfyUI: latent formats carry `spacial_downscale_ratio` (stand-in: a subclass that sets it)."""
    m = models["flux"].clone()
    fmt = m.get_model_object("latent_format")
    m.add_object_patch("latent_format", type("Newer", (type(fmt),), {"spacial_downscale_ratio": 4})())
    assert latent_shape(m, 64, 32) == (16, 8, 16)


def test_collect_node_on_flux2(comfy, models, tmp_path):
    import folder_paths

    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGCollectActivations"]
    old_out, old_in = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path))
    try:
        (tmp_path / "prompts.jsonl").write_text("".join(f'{{"prompt": "a thing {i}", "label": "safe"}}\n' for i in range(2)))
        node.execute(model=models["flux2"], clip=FakeClip("flux2"), prompt_file="prompts.jsonl",
                     positions="input.txt,double.0.img,single.0.txt", steps=2, seed=5, token_budget=64,
                     record_steps="all", output_name="flux2", cfg=1.0, guidance=3.5, sampler_name="euler",
                     scheduler="simple", width=64, height=64, negative_prompt="", dtype="float16")
        s = ActivationStore(str(tmp_path / "output" / "safedig_activations" / "flux2"))
        assert s.config["runner"]["latent_shape"] == [128, 4, 4] and s.config["runner"]["family"] == "flux2"
        assert s.rows("double.0.img") == 2 * 2 * 16  # 64 px / 16 = 4 x 4 image tokens, all kept
        assert s.rows("single.0.txt") == s.rows("input.txt") == 2 * 2 * 64  # 512 padded text tokens, budget 64
    finally:
        folder_paths.set_output_directory(old_out)
        folder_paths.set_input_directory(old_in)
