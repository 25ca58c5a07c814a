"""The nodes in the real ComfyUI runtime: tiny random-weight FLUX and SD3 models, real KSampler runs."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_dictionary

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.patches import SharedSteerers
from safedig_core.formats.dictionary import save

pytestmark = pytest.mark.comfy

FLUX_W, SD3_W = 64, 128


@pytest.fixture(scope="module")
def flux(comfy):
    return comfyui.tiny_flux(seed=1)


@pytest.fixture(scope="module")
def sd3(comfy):
    return comfyui.tiny_sd3(seed=2)


def conds(family, seed=0, ref=None):
    g = torch.Generator().manual_seed(seed)
    pooled = 768 if family == "flux" else 2048
    extra = {"guidance": 3.5} if family == "flux" else {}
    if ref is not None:
        extra["reference_latents"] = [ref]
    pos = comfyui.conditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, pooled, generator=g), **extra)
    neg = comfyui.conditioning(torch.randn(1, 8, 64, generator=g) * 0.1, torch.zeros(1, pooled), **extra)
    return pos, neg


def run(model, family, seed=0, steps=3, ref=None):
    pos, neg = conds(family, ref=ref)
    return comfyui.sample(model, pos, neg, torch.zeros(1, 16, 8, 8), seed=seed, steps=steps, cfg=2.0)


def load(comfy, tmp_path, d, name="dict.safetensors"):
    path = tmp_path / name
    save(d, str(path))
    loaded = comfy.NODE_CLASS_MAPPINGS["SafeDIGLoadDictionary"]
    from importlib import import_module
    mod = import_module(loaded.__module__)
    return mod.LoadedDictionary.from_file(str(path), name)


def apply(comfy, model, loaded, **kw):
    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"]
    args = dict(blend=1.0, repel=1.0, threshold=0.0, start_percent=0.0, end_percent=1.0, apply_to="both",
                positions="all", preserve_norm=False)
    args.update(kw)
    return node.execute(model=model, dictionary=loaded, **args).result[0]


class Recorder:
    """Wraps each steerer of a store to record (position, tokens seen, rows mask, changed?)."""

    def __init__(self, store: SharedSteerers, monkeypatch):
        self.calls = []
        for p, st in store.steerers.items():
            orig = st.steer

            def rec(x, cfg, rows=None, _p=p, _orig=orig):
                out = _orig(x, cfg, rows)
                self.calls.append((str(_p), x.shape[1], None if rows is None else rows.tolist(), out is not x))
                return out

            monkeypatch.setattr(st, "steer", rec)

    def positions(self):
        return {c[0] for c in self.calls}


def test_hooks_run_at_exactly_the_chosen_positions(comfy, flux, tmp_path, monkeypatch):
    d = make_dictionary("flux", FLUX_W, ["double.0.img", "double.1.txt", "single.0.txt", "single.1.img", "single.0.img"])
    loaded = load(comfy, tmp_path, d)
    rec = Recorder(loaded.store, monkeypatch)
    m = apply(comfy, flux, loaded, positions="double.0.img, single.1.img,double.1.txt")
    run(m, "flux", steps=2)
    assert rec.positions() == {"double.0.img", "single.1.img", "double.1.txt"}
    tokens = {c[0]: c[1] for c in rec.calls}
    assert tokens == {"double.0.img": 16, "single.1.img": 16, "double.1.txt": 8}  # 8×8 latent, patch 2; 8 text tokens
    assert len(rec.calls) == 3 * 2  # once per position per model call; cond and uncond share one batched call


def test_single_block_split_skips_reference_image_tokens(comfy, flux, tmp_path, monkeypatch):
    d = make_dictionary("flux", FLUX_W, ["double.0.img", "single.0.txt", "single.0.img"])
    loaded = load(comfy, tmp_path, d)
    rec = Recorder(loaded.store, monkeypatch)
    run(apply(comfy, flux, loaded), "flux", steps=1, ref=torch.randn(1, 16, 8, 8))
    assert {(c[0], c[1]) for c in rec.calls} == {("double.0.img", 16), ("single.0.txt", 8), ("single.0.img", 16)}


def test_identity_at_zero_strength_is_bit_exact(comfy, flux, sd3, tmp_path):
    for model, family, width, names in ((flux, "flux", FLUX_W, ["double.0.img", "single.1.img", "single.0.txt"]),
                                        (sd3, "sd3", SD3_W, ["joint.0.img", "joint.0.txt", "joint.1.img"])):
        loaded = load(comfy, tmp_path, make_dictionary(family, width, names), f"{family}.safetensors")
        base = run(model, family)
        steered = run(apply(comfy, model, loaded, blend=0.0, repel=0.0), family)
        assert torch.equal(base, steered), family


def test_steering_changes_output_only_when_harmful_latents_fire(comfy, flux, sd3, tmp_path):
    for model, family, width, names in ((flux, "flux", FLUX_W, ["double.1.img", "single.0.img"]),
                                        (sd3, "sd3", SD3_W, ["joint.0.img", "joint.1.img"])):
        base = run(model, family)
        firing = load(comfy, tmp_path, make_dictionary(family, width, names, fire=True), "fire.safetensors")
        silent = load(comfy, tmp_path, make_dictionary(family, width, names, fire=False), "silent.safetensors")
        assert not torch.equal(run(apply(comfy, model, firing), family), base), family
        assert torch.equal(run(apply(comfy, model, silent), family), base), family
        huge_gate = apply(comfy, model, firing, threshold=1000.0)
        assert torch.equal(run(huge_gate, family), base), family


def test_input_model_is_never_changed(comfy, flux, tmp_path):
    loaded = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img"]))
    before = run(flux, "flux")
    options = copy.deepcopy(flux.model_options)
    steered = apply(comfy, flux, loaded)
    assert steered is not flux and steered.model is flux.model
    run(steered, "flux")
    assert torch.equal(run(flux, "flux"), before)
    assert "patches_replace" not in flux.model_options["transformer_options"]
    assert flux.model_options.keys() == options.keys()


def test_chained_nodes_and_foreign_patch_all_take_effect(comfy, flux, tmp_path, monkeypatch):
    foreign_calls = []

    def foreign(args, extra):
        foreign_calls.append(1)
        out = extra["original_block"](args)
        return {"img": out["img"] * 1.01, "txt": out["txt"]}

    base_model = flux.clone()
    base_model.set_model_patch_replace(foreign, "dit", "double_block", 0)
    first = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img"], seed=1), "a.safetensors")
    second = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img", "single.0.img"], seed=2), "b.safetensors")
    rec1, rec2 = Recorder(first.store, monkeypatch), Recorder(second.store, monkeypatch)
    chained = apply(comfy, apply(comfy, base_model, first), second)
    run(chained, "flux", steps=2)
    assert foreign_calls and rec1.positions() == {"double.0.img"}
    assert rec2.positions() == {"double.0.img", "single.0.img"}
    assert all(c[3] for c in rec1.calls + rec2.calls)  # every hook steered something
    # and each layer contributes: dropping any one changes the output
    only_foreign = run(base_model, "flux", steps=2)
    first_only = run(apply(comfy, base_model, first), "flux", steps=2)
    both = run(chained, "flux", steps=2)
    assert not torch.equal(only_foreign, first_only) and not torch.equal(first_only, both)


def test_window_and_halves(comfy, flux, tmp_path, monkeypatch):
    loaded = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img"]))
    rec = Recorder(loaded.store, monkeypatch)
    run(apply(comfy, flux, loaded, start_percent=0.5, end_percent=1.0), "flux", steps=4)
    assert len(rec.calls) == 2  # steps 2 and 3 of 4
    rec.calls.clear()
    run(apply(comfy, flux, loaded, start_percent=0.0, end_percent=0.25), "flux", steps=4)
    assert len(rec.calls) == 1
    rec.calls.clear()
    base = run(flux, "flux", steps=2)
    run(apply(comfy, flux, loaded, apply_to="cond"), "flux", steps=2)
    assert rec.calls and all(c[2] is not None and sum(c[2]) == 1 for c in rec.calls)  # one of the two halves
    cond_only = run(apply(comfy, flux, loaded, apply_to="cond"), "flux", steps=2)
    uncond_only = run(apply(comfy, flux, loaded, apply_to="uncond"), "flux", steps=2)
    assert not torch.equal(cond_only, base) and not torch.equal(uncond_only, base)
    assert not torch.equal(cond_only, uncond_only)


def test_mismatched_dictionary_is_rejected_with_a_clear_message(comfy, flux, sd3, tmp_path):
    cases = [
        (flux, make_dictionary("flux", 32, ["double.0.img"]), r"double\.0\.img has width 32 in the dictionary but 64"),
        (flux, make_dictionary("flux", FLUX_W, ["double.5.img"]), r"double\.5\.img: the model has 2 double blocks"),
        (flux, make_dictionary("sd3", FLUX_W, ["joint.0.img"]), r"made for SD3, but the model is FLUX"),
        (sd3, make_dictionary("sd3", SD3_W, ["joint.1.txt"]), r"joint\.1\.txt: the last joint block outputs no text"),
    ]
    for i, (model, d, message) in enumerate(cases):
        loaded = load(comfy, tmp_path, d, f"bad{i}.safetensors")
        with pytest.raises(ValueError, match=message):  # the pack loads its own copy of DictionaryError
            apply(comfy, model, loaded)
    loaded = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img"]), "ok.safetensors")
    with pytest.raises(ValueError, match=r"single\.0\.img .*not in the dictionary"):
        apply(comfy, flux, loaded, positions="single.0.img")


def test_patch_follows_device_and_dtype_and_is_shared_by_clones(comfy, flux, tmp_path):
    loaded = load(comfy, tmp_path, make_dictionary("flux", FLUX_W, ["double.0.img"]))
    m = apply(comfy, flux, loaded)
    patch = m.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    clone = m.clone()
    cloned = clone.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)]
    assert cloned is not patch and cloned.store is patch.store  # weights are not copied per clone
    m.model_patches_to(torch.float16)
    m.model_patches_to(torch.device("cpu"))
    (st,) = loaded.store.steerers.values()  # the pack has its own copy of the Position class
    working = st._derived(torch.device("cpu"), torch.float16)[0]
    assert working.W_enc.dtype == torch.float16
    assert st.sae.W_enc.dtype == torch.float32  # the master copy keeps its precision
    x = torch.randn(1, 5, FLUX_W, dtype=torch.bfloat16)
    cfg = loaded.dictionary.default_config()
    assert st.steer(x, cfg).dtype == torch.bfloat16
