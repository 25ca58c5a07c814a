"""All seven SafeDIG nodes run the way ComfyUI runs them (tests/node_exec.py: the executor's own call path
inside `torch.inference_mode()`), chained as a user would: Collect Activations → Build Dictionary → Load
Dictionary → Select Features → Apply Steering / Feature Map → Safety Check."""
from __future__ import annotations

import os

import pytest
import torch
from node_exec import FakeClip, run_node

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.runner import tiny_encoder
from safedig_core.formats.dictionary import load

pytestmark = pytest.mark.comfy

CATEGORIES = ("violence", "fire", "weapons")


@pytest.fixture(scope="module")
def server_dirs(comfy, tmp_path_factory):
    """ComfyUI's input, output and models/sae folders pointed at a temp tree for this module."""
    import folder_paths

    base = tmp_path_factory.mktemp("comfy_dirs")
    for sub in ("input", "output", "sae"):
        (base / sub).mkdir()
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    old_sae = folder_paths.folder_names_and_paths.get("sae")
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.folder_names_and_paths["sae"] = ([str(base / "sae")], {".safetensors"})
    try:
        yield base
    finally:
        folder_paths.set_input_directory(old[0])
        folder_paths.set_output_directory(old[1])
        if old_sae is not None:
            folder_paths.folder_names_and_paths["sae"] = old_sae


@pytest.fixture(scope="module")
def flux(comfy):
    return comfyui.tiny_flux(seed=3)


def prompt_rows() -> str:
    rows = ["prompt,label,category,domain"]
    rows += [f"a calm lake {i},safe,,source" for i in range(6)]
    rows += [f"{c} scene {i},unsafe,{c},source" for c in CATEGORIES for i in range(3)]
    rows += [f"poison bottle {i},unsafe,poison,target" for i in range(3)]
    rows += [f"quiet meadow {i},safe,,target" for i in range(2)]
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def built(comfy, flux, server_dirs):
    """Collect then Build, both through the executor; returns the Build node's summary."""
    (server_dirs / "input" / "prompts.csv").write_text(prompt_rows())
    (text,), ui = run_node(comfy, "SafeDIGCollectActivations", model=flux, clip=FakeClip("flux"),
                           prompt_file="prompts.csv", positions="double.0.img,double.1.img,single.0.img,single.1.img",
                           steps=3, seed=0, token_budget=8, record_steps="0,1,2", output_name="exec/run",
                           cfg=2.0, guidance=3.5, sampler_name="euler", scheduler="simple", width=64, height=64,
                           negative_prompt="", dtype="float16")
    assert "complete" in text and "output/safedig_activations/exec/run" in text and str(server_dirs) not in text
    (summary,), _ = run_node(comfy, "SafeDIGBuildDictionary", store="exec/run", dictionary_name="built", routed_positions=2,
                             train_steps=40, adapt_steps=20, expansion=2, k=4, batch_size=64, seed=0, overwrite=False)
    return summary


def test_build_trains_under_inference_mode_and_keeps_its_work_out_of_models_sae(comfy, built, server_dirs):
    path = server_dirs / "sae" / "built.safetensors"
    d = load(str(path))
    assert len(d.positions) == 2 and "routed:" in built and "family FLUX" in built
    for e in d.entries.values():
        # trained, not the initialisation: the decoder rows moved and the reconstruction explains the data
        assert e.metrics["fvu"] < 1.0 and e.harmful and e.metrics["target_fvu_after"] < e.metrics["target_fvu_before"]
    assert os.listdir(server_dirs / "sae") == ["built.safetensors"]  # no work folder, no checkpoint listed
    assert (server_dirs / "output" / "safedig_builds" / "built.work" / "build.json").exists()
    assert str(server_dirs) not in built and "output/safedig_builds/built.work" in built
    assert "/" not in str(d.provenance["store"]) and len(d.provenance["store_sha256"]) == 64


def test_build_refuses_to_overwrite_unless_asked(comfy, built, server_dirs):
    path = server_dirs / "sae" / "built.safetensors"
    before = path.read_bytes()
    args = dict(store="exec/run", dictionary_name="built", routed_positions=2, train_steps=40, adapt_steps=20, expansion=2,
                k=4, batch_size=64, seed=0)
    with pytest.raises(ValueError, match="already exists; ask to overwrite"):
        run_node(comfy, "SafeDIGBuildDictionary", **args, overwrite=False)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=r"holds a build from other settings \(.*train"):
        run_node(comfy, "SafeDIGBuildDictionary", **{**args, "train_steps": 41}, overwrite=True)
    (summary,), _ = run_node(comfy, "SafeDIGBuildDictionary", **args, overwrite=True)  # same settings: resumes
    assert "routed:" in summary


def test_load_select_apply_feature_map_and_safety_check(comfy, flux, built, server_dirs):

    (loaded,), _ = run_node(comfy, "SafeDIGLoadDictionary", dictionary_name="built.safetensors")
    p = loaded.dictionary.positions[0]
    (picked,), _ = run_node(comfy, "SafeDIGSelectFeatures", dictionary=loaded, position=p.name, latents="0, 1, 2",
                            mode="replace")
    assert picked.dictionary.entries[p].harmful == [0, 1, 2] and loaded.dictionary.entries[p].harmful != [0, 1, 2]
    steer = dict(blend=1.0, repel=1.0, threshold=0.0, start_percent=0.0, end_percent=1.0, apply_to="both",
                 positions="all", preserve_norm=False)
    (steered,), _ = run_node(comfy, "SafeDIGApplySteering", model=flux, dictionary=loaded, **steer)
    (same,), _ = run_node(comfy, "SafeDIGApplySteering", model=flux, dictionary=loaded,
                          **{**steer, "blend": 0.0, "repel": 0.0})
    pos, neg = tiny_encoder("flux")("fire scene 0")
    with torch.inference_mode():
        base = comfyui.sample(flux, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3)
        out = comfyui.sample(steered, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3)
        zero = comfyui.sample(same, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3)
    assert torch.isfinite(out).all() and not torch.equal(out, base) and torch.equal(zero, base)

    from test_feature_map import tiny_vae

    (latent, image, heatmaps, text), ui = run_node(
        comfy, "SafeDIGFeatureMap", model=flux, dictionary=picked, positive=pos, negative=neg,
        latent_image={"samples": torch.zeros(1, 16, 8, 8)}, vae=tiny_vae(), seed=3, steps=2, cfg=2.0,
        sampler_name="euler", scheduler="simple", positions="all", start_percent=0.0, end_percent=1.0)
    assert image.shape == (1, 64, 64, 3) and heatmaps.shape[0] == len([q for q in picked.dictionary.positions
                                                                      if q.stream == "img"])
    (report, any_unsafe, count, annotated), ui = run_node(comfy, "SafeDIGSafetyCheck", images=image,
                                                          detector="testbed", threshold=0.0, classes="default")
    assert report.startswith("testbed") and annotated.shape == image.shape and any_unsafe == (count > 0)
    assert list(ui["text"]) == [report]


def test_a_failed_build_leaves_nothing_in_models_sae(comfy, built, server_dirs):
    with pytest.raises(ValueError):
        run_node(comfy, "SafeDIGBuildDictionary", store="exec/run", dictionary_name="broken", routed_positions=2,
                 train_steps=10, adapt_steps=0, expansion=2, k=10_000, batch_size=64, seed=0, overwrite=False)
    assert sorted(os.listdir(server_dirs / "sae")) == ["built.safetensors"]
