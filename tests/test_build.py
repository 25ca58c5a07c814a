"""`safedig build` and the SafeDIG Build Dictionary node on a store collected from tiny FLUX in the real
ComfyUI: route → train → adapt, the file it writes steers through the Apply node, interruption resumes,
bad stores are refused with a clear message."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.runner import ComfyRunner, tiny_encoder
from safedig_core.formats.dictionary import load
from safedig_core.formats.prompts import PromptRecord
from safedig_core.formats.store import ActivationStore
from safedig_core.pipeline.adapt import AdaptConfig
from safedig_core.pipeline.build import SOURCE_DICTIONARY, BuildConfig, build
from safedig_core.pipeline.collect import collect
from safedig_core.pipeline.train import TrainConfig
from safedig_core.positions import parse

pytestmark = pytest.mark.comfy

CATEGORIES = ("violence", "fire", "weapons")


def records(target=True):
    rows = [PromptRecord(f"s{i}", f"a calm lake {i}", "safe", "", "source") for i in range(6)]
    rows += [PromptRecord(f"{c}{i}", f"{c} scene {i}", "unsafe", c, "source") for c in CATEGORIES for i in range(3)]
    if target:
        rows += [PromptRecord(f"t{i}", f"poison bottle {i}", "unsafe", "poison", "target") for i in range(3)]
        rows += [PromptRecord(f"ts{i}", f"quiet meadow {i}", "safe", "", "target") for i in range(2)]
    return rows


@pytest.fixture(scope="module")
def flux(comfy):
    return comfyui.tiny_flux(seed=3)


@pytest.fixture(scope="module")
def store(flux, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("store"))
    runner = ComfyRunner(flux, tiny_encoder("flux"), cfg=2.0, latent_shape=(16, 8, 8), name="tiny-flux")
    collect(runner, records(), "double.0.img,double.1.img,single.0.img,single.1.img,single.0.txt", path, 3,
            "0,1,2", 8, seed=0)
    return ActivationStore(path)


def config(**kw):
    return BuildConfig(top_k=2, train=TrainConfig(expansion=4, k=8, steps=60, batch_size=128, checkpoint_every=20),
                       adapt=AdaptConfig(steps=30, batch_size=128), **kw)


def test_build_routes_trains_adapts_and_the_file_steers(comfy, flux, store, tmp_path):
    out = str(tmp_path / "dict.safetensors")
    summary = build(store, out, config(), str(tmp_path / "work"), progress=False)
    d = load(out)
    assert [p.name for p in d.positions] == sorted(summary["positions"]) and len(d.positions) == 2
    assert (tmp_path / "work" / "routing.json").exists() and (tmp_path / "work" / "routing.png").exists()
    for e in d.entries.values():
        assert e.sae.latents == 4 * 64 and e.harmful
        assert "fvu" in e.metrics and "target_fvu_after" in e.metrics
        assert e.metrics["target_fvu_after"] < e.metrics["target_fvu_before"]
        assert e.image_gate_scale > 0 and e.metrics["image_gate_scale"] == e.image_gate_scale  # the per-image unit
    # the encoder is the source dictionary's, bit for bit (decoder-only adaptation)
    src = load(str(tmp_path / "work" / SOURCE_DICTIONARY))
    for p, e in d.entries.items():
        assert torch.equal(e.sae.W_enc, src.entries[p].sae.W_enc)
        assert not torch.equal(e.sae.W_dec, src.entries[p].sae.W_dec)
    assert d.provenance["routing"]["selected"] == summary["positions"]

    mod = importlib.import_module(comfy.NODE_CLASS_MAPPINGS["SafeDIGLoadDictionary"].__module__)
    loaded = mod.LoadedDictionary.from_file(out)
    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"]
    steered = node.execute(model=flux, dictionary=loaded, blend=1.0, repel=1.0, threshold=0.0, start_percent=0.0,
                           end_percent=1.0, apply_to="both", positions="all", preserve_norm=False).result[0]
    enc = tiny_encoder("flux")
    pos, neg = enc("fire scene 0")
    base = comfyui.sample(flux, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3)
    assert not torch.equal(comfyui.sample(steered, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3), base)
    per_image = node.execute(model=flux, dictionary=loaded, blend=1.0, repel=1.0, threshold=0.0, start_percent=0.0,
                             end_percent=1.0, apply_to="both", positions="all", preserve_norm=False,
                             gate="per image", detect_at="each position").result[0]
    assert not torch.equal(comfyui.sample(per_image, pos, neg, torch.zeros(1, 16, 8, 8), seed=1, steps=3), base)


def test_interrupted_build_resumes(store, tmp_path):
    polls = {"n": 0}

    def stop_soon():
        polls["n"] += 1
        return polls["n"] > 45  # inside the first position's training, after its checkpoint at step 40

    with pytest.raises(KeyboardInterrupt):
        build(store, str(tmp_path / "d.safetensors"), config(), str(tmp_path / "work"), progress=False,
              should_stop=stop_soon)
    assert not (tmp_path / "d.safetensors").exists()
    assert list((tmp_path / "work" / "train").glob("*.ckpt.safetensors"))
    build(store, str(tmp_path / "d.safetensors"), config(), str(tmp_path / "work"), progress=False)
    assert len(load(str(tmp_path / "d.safetensors")).positions) == 2


def test_build_node_saves_into_models_sae(comfy, store, tmp_path, monkeypatch):
    import shutil

    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sae", ([str(tmp_path / "sae")], {".safetensors"}))
    old_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    try:
        shutil.copytree(store.path, tmp_path / "output" / "safedig_activations" / "mine")
        node = comfy.NODE_CLASS_MAPPINGS["SafeDIGBuildDictionary"]
        args = dict(store="mine", dictionary_name="from_node", routed_positions=1, train_steps=20, adapt_steps=10,
                    expansion=2, k=4, batch_size=64, seed=0)
        text = node.execute(**args).result[0]
        assert (tmp_path / "sae" / "from_node.safetensors").exists()
        assert "routed:" in text and "family FLUX" in text
        assert len(load(str(tmp_path / "sae" / "from_node.safetensors")).positions) == 1
        for bad in (store.path, "../x", "/etc", "mine/../../x"):  # a store is a name in output/safedig_activations
            with pytest.raises(ValueError, match="store"):
                node.execute(**{**args, "store": bad})
    finally:
        folder_paths.set_output_directory(old_out)


def test_build_refuses_to_replace_or_to_resume_other_work(store, tmp_path):
    out, work = str(tmp_path / "d.safetensors"), str(tmp_path / "work")
    build(store, out, config(positions=["double.0.img"]), work, progress=False)
    before = open(out, "rb").read()
    with pytest.raises(ValueError, match="already exists; ask to overwrite"):
        build(store, out, config(positions=["double.0.img"]), work, progress=False)
    assert open(out, "rb").read() == before
    with pytest.raises(ValueError, match=r"holds a build from other settings \(positions\)"):
        build(store, str(tmp_path / "e.safetensors"), config(positions=["single.0.img"]), work, progress=False)

    class Other:  # the same store with one prompt less: another store to the work folder
        def __init__(self, s):
            self.manifest, self.prompts, self.path = s.manifest, s.prompts[:-1], s.path

    with pytest.raises(ValueError, match="holds a build from another store"):
        build(Other(store), str(tmp_path / "e.safetensors"), config(positions=["double.0.img"]), work,
              progress=False)
    build(store, out, config(positions=["double.0.img"]), work, progress=False, overwrite=True)  # asked: done
    d = load(out)
    assert d.provenance["store"] == os.path.basename(store.path) and len(d.provenance["store_sha256"]) == 64
    assert not any(str(tmp_path) in str(v) or os.sep + "tmp" in str(v) for v in d.provenance.values())


def test_all_safe_store_is_refused(flux, tmp_path):
    runner = ComfyRunner(flux, tiny_encoder("flux"), cfg=2.0, latent_shape=(16, 8, 8), name="tiny-flux")
    safe = [r for r in records(target=False) if r.label == "safe"]
    collect(runner, safe, "double.0.img,single.0.img", str(tmp_path / "s"), 2, "0", 4, seed=0)
    with pytest.raises(ValueError, match="unsafe"):
        build(ActivationStore(str(tmp_path / "s")), str(tmp_path / "d.safetensors"), config(), progress=False)


def test_a_position_builds_the_same_alone_or_among_others(store, tmp_path):
    """Training, adaptation and the gate unit run per position with the same seed: the demo's fixed-layer
    ablation therefore reuses the routed dictionary's SAE at that position instead of building it again."""
    both = load(build(store, str(tmp_path / "both.safetensors"), config(positions=["double.0.img", "single.1.img"]),
                      str(tmp_path / "w2"), progress=False)["dictionary"])
    alone = load(build(store, str(tmp_path / "one.safetensors"), config(positions=["single.1.img"]),
                       str(tmp_path / "w1"), progress=False)["dictionary"])
    p = parse("single.1.img")
    a, b = alone.entries[p], both.entries[p]
    assert all(torch.equal(x, y) for x, y in zip(a.sae.state_dict().values(), b.sae.state_dict().values()))
    assert a.harmful == b.harmful and a.scores == b.scores and a.gate_scale == b.gate_scale
