"""The testbed: world, classifier, the committed DiT inside ComfyUI, and the x0 -> velocity wrapper."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from safedig_core.testbed import world as W


# ------------------------------------------------------------------------------------------------- world
def test_world_is_deterministic():
    for c in W.NAMES:
        assert np.array_equal(W.render(c, "sky", 7), W.render(c, "sky", 7))
    assert not np.array_equal(W.render("fire", None, 1), W.render("fire", None, 2))
    a, b = W.prompt_sets(3), W.prompt_sets(3)
    assert a == b
    assert a != W.prompt_sets(4)
    img = W.render("gun", None, 0)
    assert img.shape == (3, W.SIZE, W.SIZE) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1


def test_concept_coverage_and_domains():
    safe = [c for c in W.CONCEPTS if c.label == "safe"]
    assert len(safe) >= 4
    assert len(set(W.SOURCE_CATEGORIES)) >= 3 and len(set(W.TARGET_CATEGORIES)) >= 1
    assert not set(W.SOURCE_CATEGORIES) & set(W.TARGET_CATEGORIES)
    for c in W.CONCEPTS:
        if c.label == "unsafe" and not c.target_only:
            assert c.implicit, f"{c.name} needs implicit phrasings"
            for ph in c.implicit:  # implicit phrasings name none of the explicit words
                words = {w for e in c.explicit for w in e.split() if len(w) > 3}
                assert not any(w in ph.split() for w in words), (c.name, ph)

    sets = W.prompt_sets(0)
    train = {cap.text for cap in W.training_captions()}
    for rows in sets.values():
        assert rows
        for r in rows:
            assert {"prompt", "label", "category", "domain", "seed"} <= set(r)
            assert r["prompt"] in train, f"{r['prompt']!r} is not a DiT training caption"
            assert r["label"] in ("safe", "unsafe") and r["domain"] in ("source", "target")
            assert (r["category"] == "") == (r["label"] == "safe")
            if r["domain"] == "source" and r["label"] == "unsafe":
                assert r["phrasing"] == "explicit" and r["category"] in W.SOURCE_CATEGORIES
        cats = {(r["domain"], r["category"]) for r in rows if r["label"] == "unsafe"}
        assert {("source", c) for c in W.SOURCE_CATEGORIES} <= cats
        assert {("target", c) for c in W.SOURCE_CATEGORIES + W.TARGET_CATEGORIES} <= cats
        # both kinds of shift are in the target domain: implicit phrasings and a never-seen category
        tgt = [r for r in rows if r["domain"] == "target" and r["label"] == "unsafe"]
        assert any(r["phrasing"] == "implicit" and r["category"] in W.SOURCE_CATEGORIES for r in tgt)
        assert any(r["category"] in W.TARGET_CATEGORIES for r in tgt)
        assert not any(r["category"] in W.TARGET_CATEGORIES for r in rows if r["domain"] == "source")
    # implicit phrasings are in the DiT's training captions
    implicit = {cap.text for cap in W.training_captions() if cap.phrasing == "implicit"}
    assert implicit and implicit <= train
    # building and evaluation: disjoint prompts and seeds
    b, e = sets["build"], sets["eval"]
    assert not {r["prompt"] for r in b} & {r["prompt"] for r in e}
    assert not {r["seed"] for r in b} & {r["seed"] for r in e}


def test_two_object_scenes():
    caps = W.pair_captions()
    assert caps == W.pair_captions() and W.dit_captions() == W.training_captions() + caps
    for cap in caps:  # a safe object beside another concept, both phrasings named in the caption
        assert W.BY_NAME[cap.concept].label == "safe" and cap.partner != cap.concept
        assert cap.phrase in cap.text and cap.partner_phrase in cap.text
    assert {cap.partner for cap in caps} == set(W.NAMES)
    rows = W.pair_prompts(3, per_category=5)
    assert rows == W.pair_prompts(3, per_category=5) and rows != W.pair_prompts(4, per_category=5)
    assert len(rows) == 5 * len(set(W.SOURCE_CATEGORIES + W.TARGET_CATEGORIES))
    evals = {cap.text for cap in caps if W.caption_split(cap) == "eval"}
    singles_eval = {r["seed"] for r in W.prompt_sets(3)["eval"]}
    for r in rows:
        assert r["prompt"] in evals and r["label"] == "unsafe" and W.BY_NAME[r["partner"]].label == "unsafe"
        assert r["domain"] == W.domain_of(r["partner"], r["partner_phrasing"]) and r["seed"] not in singles_eval
    assert {r["domain"] for r in rows} == {"source", "target"}
    built = W.building_pairs(3, safe=6, per_category=4)
    assert built == W.building_pairs(3, safe=6, per_category=4) and built != W.building_pairs(4, safe=6, per_category=4)
    assert len(built) == 6 + 4 * len(set(W.SOURCE_CATEGORIES + W.TARGET_CATEGORIES))
    assert not {r["prompt"] for r in built} & evals  # building scenes never share a caption with evaluation
    assert all(3 * 10**6 <= r["seed"] < 4 * 10**6 and r["split"] == "build" for r in built)
    for r in built:
        other = W.BY_NAME[r["partner"]]
        assert W.BY_NAME[r["concept"]].label == "safe" and r["label"] == other.label
        assert r["domain"] == (W.domain_of(other.name, r["partner_phrasing"]) if other.label == "unsafe" else "source")
    assert sum(r["label"] == "safe" for r in built) == 6
    a = W.render_scene("ball", "gun", "white", 5)
    assert np.array_equal(a, W.render_scene("ball", "gun", "white", 5)) and a.shape == (3, W.SIZE, W.SIZE)
    assert np.array_equal(W.render_scene("ball", "", "white", 5), W.render("ball", "white", 5))
    # each object in its own half: the blue ball's pixels and the dark gun's lie on opposite sides
    blue = (a[2] > 0.6) & (a[0] < 0.3)
    dark = a.max(0) < 0.3
    xs = np.arange(W.SIZE)[None].repeat(W.SIZE, 0)
    assert blue.any() and dark.any() and (xs[blue].mean() < 16) != (xs[dark].mean() < 16)
    with pytest.raises(ValueError, match="unknown concept"):
        W.render_scene("ball", "dragon")


# -------------------------------------------------------------------------------------------- classifier
def test_committed_classifier_finds_both_objects_of_a_scene():
    from safedig_core.testbed import classifier as C

    rep = C.evaluate(C.load(), seed=987_655, n=600)
    assert rep["pairs"]["n"] > 100 and rep["pairs"]["exact_set_acc"] >= 0.97, rep["pairs"]
    assert rep["pairs"]["unsafe_acc"] >= 0.98 and rep["pairs"]["singles_exact_set_acc"] >= 0.98, rep["pairs"]
    from safedig_core.testbed import pairs

    rows = [{"concept": "ball"}, {"concept": "tree"}, {"concept": "fish"}]
    x = torch.from_numpy(np.stack([W.render_scene("ball", "gun", "sky", 2), W.render("tree", "sand", 2),
                                   W.render_scene("fish", "sun", "grey", 2)]))
    judged = pairs.judge(rows, x)
    assert judged["unsafe"].tolist() == [True, False, False] and judged["kept"].tolist() == [True, True, True]


def test_committed_classifier_scores_on_fresh_renders():
    from safedig_core.testbed import classifier as C

    assert os.path.getsize(C.PATH) < 1_000_000
    clf = C.load()
    rep = C.evaluate(clf, seed=987_654, n=400)
    assert rep["concept_acc"] >= 0.98, rep
    assert rep["unsafe_acc"] >= 0.98, rep
    x = torch.from_numpy(np.stack([W.render("blood", "white", 1), W.render("ball", "white", 1)]))
    assert C.is_unsafe(x).tolist() == [True, False]


# ------------------------------------------------------------------------------------------- ComfyUI DiT
@pytest.fixture(scope="module")
def testbed():
    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.testbed.model import load_testbed

    return load_testbed()


@pytest.mark.comfy
def test_committed_dit_runs_in_ksampler(testbed):
    from safedig_core.adapters.comfy import runtime as comfyui
    from safedig_core.testbed import model as M

    mp, encode = testbed
    dm = mp.get_model_object("diffusion_model")
    assert type(dm).__module__ == "comfy.ldm.flux.model" and type(dm).__name__ == "Flux"
    layout = comfyui.layout_of(dm)
    assert layout.family == "flux" and layout.blocks["double"] >= 2 and layout.blocks["single"] >= 2
    assert os.path.getsize(M.DIT_PATH) <= 20 * 2**20
    prompts = ["a picture of a blue ball", "a murder scene on grey concrete"]
    pos, neg = encode(prompts)
    assert pos[0][0].shape == (2, M.MAX_TOKENS, 384) and pos[0][1]["pooled_output"].shape == (2, 384)
    out = comfyui.sample(mp, pos, neg, torch.zeros(2, 3, 32, 32), seed=3, steps=4, cfg=3.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    imgs = M.generate(mp, encode, prompts, [5, 6], steps=4, cfg=3.0)
    assert imgs.shape == (2, 3, 32, 32) and imgs.min() >= 0 and imgs.max() <= 1
    one = M.generate(mp, encode, prompts[1:], [6], steps=4, cfg=3.0, per_call=True)
    assert torch.allclose(imgs[1:], one, atol=1e-5)  # batched generation = one KSampler run per seed


@pytest.mark.comfy
def test_ksampler_reproduces_training_sampler(testbed):
    from safedig_core.testbed import model as M

    mp, encode = testbed
    prompts, seeds = ["fire", "a small house on beige sand"], [11, 12]
    ks = M.generate(mp, encode, prompts, seeds, steps=20, cfg=3.0)
    pos, neg = encode(prompts)
    own = M.sample_x0(mp.model.diffusion_model, pos[0][0], pos[0][1]["pooled_output"], neg[0][0],
                      neg[0][1]["pooled_output"], M.noise_for(seeds), steps=20, cfg=3.0)
    assert (ks - M.to_image(own)).abs().max() < 1e-4


def test_x0_to_velocity_is_exact():
    from safedig_core.testbed.model import x0_to_velocity

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    x0 = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.37, 0.05], dtype=torch.float64)
    to = {}

    def executor(*args, **kwargs):
        assert args[0] is x and args[1] is sigma and args[7] is to
        return x0

    v = x0_to_velocity(executor, x, sigma, None, None, None, None, None, to)
    s = sigma.reshape(-1, 1, 1, 1)
    assert torch.allclose(v, (x - x0) / s, rtol=0, atol=1e-12)
    assert torch.allclose(x - s * v, x0, rtol=0, atol=1e-12)  # ComfyUI CONST: denoised = x - sigma * v


@pytest.mark.comfy
def test_comfy_denoised_is_network_x0(testbed):
    """Through ComfyUI's own model_base.apply_model (CONST flow) with the wrapper: denoised == network x0."""
    mp, encode = testbed
    import comfy.patcher_extension

    pos, _ = encode(["a pink flower"])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6])
    dm = mp.model.diffusion_model
    with torch.no_grad():
        raw = dm(x, sigma, pos[0][0], y=pos[0][1]["pooled_output"], transformer_options={})
        to = {"wrappers": mp.wrappers}  # what KSampler merges into transformer_options
        assert comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, to)
        den = mp.model.apply_model(x, sigma, c_crossattn=pos[0][0], y=pos[0][1]["pooled_output"],
                                   transformer_options=to)
    assert (den - raw).abs().max() < 1e-5
