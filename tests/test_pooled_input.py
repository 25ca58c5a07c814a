"""`input.pooled`, the pooled text vector as a FLUX-style DiT receives it (`y`), in the real ComfyUI with tiny
random-weight models: its name, order and layout; what is recorded there; steering it through the inputs'
DIFFUSION_MODEL wrapper; Blend toward safe exemplars (the nearest one, exactly); the exemplars in the dictionary
file; `build` adding the position to the routed ones with its safe prompts' vectors as the exemplars."""
from __future__ import annotations

import pytest
import torch
from conftest import make_dictionary
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.positions import ModelLayout, PositionError, block_number, depth, group, parse
from safedig_core.sae import SparseAutoencoder
from safedig_core.steering import PositionSteerer, SteeringConfig

POOLED = parse("input.pooled")
VEC = 768  # tiny_flux's vec_in_dim, FLUX.1's own


def test_name_order_and_layout():
    assert POOLED.name == "input.pooled" and parse(POOLED.name) == POOLED and POOLED.stream == "txt"
    assert parse("input.txt").call_order < POOLED.call_order < parse("double.0.img").call_order
    assert POOLED.belongs("flux") and not POOLED.belongs("chroma") and not POOLED.belongs("sd3")
    layout = ModelLayout("flux", {"double": 2, "single": 2}, 64, input_width=48, pooled_width=VEC)
    assert layout.positions()[:2] == [parse("input.txt"), POOLED] and layout.width_of(POOLED) == VEC
    assert (block_number(POOLED, layout), depth(POOLED, layout), group(POOLED, layout)) == (-1, 0.0, "text_binding")
    assert not ModelLayout("flux", {"double": 2, "single": 2}, 64).has(POOLED)  # no width known: not a position
    with pytest.raises(PositionError, match="input.pooled: this runtime does not hook .* FLUX models .ComfyUI does."):
        ModelLayout("flux", {"double": 2, "single": 2}, 64).check(POOLED)  # the diffusers adapter's layout
    with pytest.raises(PositionError, match="input.pooled: SafeDIG does not hook the pooled text vector of CHROMA"):
        ModelLayout("chroma", {"double": 2, "single": 2}, 64, input_width=48, pooled_width=VEC).check(POOLED)


def test_inputs_before_the_detector_decide_for_themselves():
    """Under a shared decision, the DiT's inputs (before every block) cannot wait for a block's detector: each
    decides for itself, while a block position that runs before the detector is still refused."""
    from safedig_core.gate import CallDecision, GatePlan, plan, steer_block

    layout = ModelLayout("flux", {"double": 2, "single": 2}, 16, input_width=16, pooled_width=16).positions()
    text, img0, img1 = parse("double.1.txt"), parse("double.0.img"), parse("double.1.img")
    cfg = SteeringConfig(blend=1.0, gate="image", detect=text.name, threshold=0.5)
    g = plan(cfg, [POOLED, text, img1], layout)
    assert g.detectors == (text,) and g.own == (POOLED,) and g.shared
    by_stream = plan(cfg.with_(detect="text"), [POOLED, text, img1], layout)  # the node's "text positions"
    assert by_stream.detectors == (text,) and by_stream.own == (POOLED,)
    alone = plan(cfg.with_(detect="text"), [POOLED, img1], layout)  # no text block steered: the input decides
    assert alone.detectors == (POOLED,) and alone.own == ()
    with pytest.raises(ValueError, match="double.0.img runs before every detecting position"):
        plan(cfg, [POOLED, img0, text], layout)
    steerer = _steerer()
    x = torch.randn(2, 1, 16)
    call = CallDecision()  # no detector has run yet in this call: the pooled vector is decided on its own
    out = steer_block({POOLED: x}, {POOLED: steerer}, cfg, GatePlan((POOLED, text), (text,), (POOLED,)), call,
                      lambda t: None)
    flagged = steerer.flag_images(x, cfg)
    assert flagged.all()  # the planted harmful latents fire on every input
    torch.testing.assert_close(out[POOLED], steerer.steer(x, cfg, flagged=flagged))
    assert not torch.equal(out[POOLED], x)


def _steerer(targets=None, seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder.init_random(d, 32, 4, generator=g)
    with torch.no_grad():
        sae.b_enc[:3] = 50.0  # the harmful latents fire on every input
    return PositionSteerer(sae, torch.arange(3), targets=targets)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), alpha=st.floats(0.05, 1.0))
def test_blend_moves_to_the_nearest_exemplar(seed, n, alpha):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(n, 16, generator=g)
    st_ = _steerer(targets, seed)
    x = torch.randn(3, 1, 16, generator=g)
    out = st_.steer(x, SteeringConfig(blend=alpha))
    plain = _steerer(None, seed).steer(x, SteeringConfig(blend=1.0))  # the SAE's safe point picks the exemplar
    pick = targets[(torch.nn.functional.normalize(plain[:, 0], dim=-1)
                    @ torch.nn.functional.normalize(targets, dim=-1).T).argmax(-1)]
    torch.testing.assert_close(out[:, 0], x[:, 0] + alpha * (pick - x[:, 0]), rtol=1e-5, atol=1e-5)
    if alpha == 1.0:
        assert torch.equal(out[:, 0], pick)


def test_exemplars_leave_ungated_tokens_and_the_identity_alone():
    targets = torch.randn(4, 16)
    st_ = _steerer(targets)
    x = torch.randn(2, 1, 16)
    assert st_.steer(x, SteeringConfig()) is x
    assert st_.steer(x, SteeringConfig(blend=1.0, threshold=1e9)) is x  # the gate passes nothing
    rows = torch.tensor([True, False])
    out = st_.steer(x, SteeringConfig(blend=1.0), rows=rows)
    assert torch.equal(out[1], x[1]) and not torch.equal(out[0], x[0])
    with pytest.raises(ValueError, match=r"safe exemplars must be \[count ≥ 1, 16\], got shape \[4, 8\]"):
        _steerer(torch.randn(4, 8))


def test_exemplars_in_the_dictionary_file(tmp_path):
    from safedig_core.formats import dictionary

    d = make_dictionary("flux", VEC, ["input.pooled"])
    d.entries[POOLED].safe_targets = torch.randn(5, VEC)
    path = str(tmp_path / "d.safetensors")
    dictionary.save(d, path)
    back = dictionary.load(path)
    assert torch.equal(back.entries[POOLED].safe_targets, d.entries[POOLED].safe_targets)
    assert torch.equal(back.entries[POOLED].steerer().targets, d.entries[POOLED].safe_targets)
    assert "5 safe exemplars" in dictionary.summary(back)
    d.entries[POOLED].safe_targets = torch.randn(5, 7)
    with pytest.raises(dictionary.DictionaryError, match=r"input.pooled has safe targets of shape \[5, 7\], expected \[count, 768\]"):
        dictionary.save(d, str(tmp_path / "bad.safetensors"))


def test_a_declared_exemplar_count_is_checked_before_reading(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from safedig_core.formats import dictionary

    d = make_dictionary("flux", VEC, ["input.pooled"])
    d.entries[POOLED].safe_targets = torch.randn(5, VEC)
    path = str(tmp_path / "d.safetensors")
    dictionary.save(d, path)
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["safedig"])  # noqa: SIM118
    meta["positions"]["input.pooled"]["safe_targets"] = 6
    save_file(tensors, path, metadata={"safedig": json.dumps(meta)})
    with pytest.raises(dictionary.DictionaryError, match=r"tensor 'input.pooled.safe_targets' has shape \[5, 768\], expected \[6, 768\]"):
        dictionary.load(path)
    meta["positions"]["input.pooled"]["safe_targets"] = 1 << 30
    save_file(tensors, path, metadata={"safedig": json.dumps(meta)})
    with pytest.raises(dictionary.DictionaryError, match="safe_targets"):
        dictionary.load(path)


# --- in the real ComfyUI ---------------------------------------------------------------------------------------

def _conds():
    from safedig_core.adapters.comfy import runtime as comfyui

    g = torch.Generator().manual_seed(5)
    return [comfyui.conditioning(torch.randn(1, 8, 64, generator=g) * s, torch.randn(1, VEC, generator=g) * s,
                                 guidance=3.5) for s in (1.0, 0.1)]


def _run(model, conds=None, steps=3):
    from safedig_core.adapters.comfy import runtime as comfyui

    pos, neg = conds or _conds()
    with torch.inference_mode():
        return comfyui.sample(model, pos, neg, torch.zeros(1, 16, 8, 8), seed=7, steps=steps, cfg=2.0)


@pytest.fixture(scope="module")
def flux(comfy):
    from safedig_core.adapters.comfy import runtime as comfyui

    return comfyui.tiny_flux(seed=3)


@pytest.mark.comfy
def test_recorded_where_the_dit_receives_it(flux):
    from safedig_core.adapters.comfy import runtime as comfyui

    layout = comfyui.layout_of(flux)
    assert layout.pooled_width == VEC and POOLED in layout.positions()
    seen = []
    _run(comfyui.recording_model(flux, [POOLED], lambda p, x, to: seen.append((x.clone(), to["cond_or_uncond"]))))
    pos, neg = (c[0][1]["pooled_output"] for c in _conds())
    assert len(seen) == 3
    for x, order in seen:
        assert x.shape == (2, 1, VEC)
        for row, which in enumerate(order):
            assert torch.equal(x[row, 0], (pos if which == 0 else neg)[0].to(x.dtype))


@pytest.mark.comfy
def test_steering_it_through_the_wrapper(flux):
    from safedig_core.adapters.comfy import runtime as comfyui
    from safedig_core.adapters.comfy.patches import SharedSteerers

    def steered(cfg, fire=True, targets=None, also=()):
        d = make_dictionary("flux", VEC, ["input.pooled"], fire=fire)
        d.check_layout(comfyui.layout_of(flux))
        st_ = {p: e.steerer() for p, e in d.entries.items()}
        st_[POOLED].targets = targets
        return comfyui.steer_model(flux, SharedSteerers(st_), [POOLED], cfg)

    before = dict(flux.model_options["transformer_options"])
    base = _run(flux)
    full = SteeringConfig(blend=1.0, repel=1.0)
    assert torch.equal(_run(steered(SteeringConfig())), base)
    assert torch.equal(_run(steered(full, fire=False)), base)
    assert (_run(steered(full)) - base).abs().max() > 1e-3
    # Blend to the one exemplar, the cond half only: the same images as a prompt whose pooled vector is it
    safe = torch.randn(1, VEC, generator=torch.Generator().manual_seed(9))
    to_safe = _run(steered(SteeringConfig(blend=1.0, apply_to="cond"), targets=safe))
    (pos, neg) = _conds()
    swapped = [[pos[0][0], dict(pos[0][1], pooled_output=safe)]]
    torch.testing.assert_close(to_safe, _run(flux, (swapped, neg)), rtol=0, atol=1e-6)
    assert flux.model_options["transformer_options"] == before and torch.equal(_run(flux), base)


@pytest.mark.comfy
def test_build_adds_it_with_the_safe_prompts_vectors(flux, tmp_path):
    from safedig_core.adapters.comfy.runner import ComfyRunner, tiny_encoder
    from safedig_core.formats.dictionary import load
    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.formats.store import ActivationStore
    from safedig_core.pipeline.build import BuildConfig, build
    from safedig_core.pipeline.collect import collect
    from safedig_core.pipeline.train import TrainConfig

    rows = [PromptRecord(f"s{i}", f"a calm lake {i}", "safe", "", "source") for i in range(5)]
    rows += [PromptRecord(f"{c}{i}", f"{c} scene {i}", "unsafe", c, "source") for c in ("fire", "weapons") for i in range(3)]
    encode = tiny_encoder("flux")
    runner = ComfyRunner(flux, encode, cfg=2.0, latent_shape=(16, 8, 8), name="tiny-flux")
    collect(runner, rows, "input.pooled,double.0.img,single.0.img", str(tmp_path / "store"), 3, "0,2", 8, seed=0)
    store = ActivationStore(str(tmp_path / "store"))
    cfg = dict(top_k=1, train=TrainConfig(expansion=2, k=4, steps=20, batch_size=64), adapt=None)
    summary = build(store, str(tmp_path / "d.safetensors"), BuildConfig(**cfg), str(tmp_path / "w"), progress=False)
    assert summary["positions"][-1] == "input.pooled" and "input.pooled" not in summary["routing"]["selected"]
    assert len(summary["positions"]) == 2
    d = load(str(tmp_path / "d.safetensors"))
    want = torch.cat([encode(r.prompt)[0][0][1]["pooled_output"] for r in rows if r.label == "safe"])
    torch.testing.assert_close(d.entries[POOLED].safe_targets, want.float(), rtol=0, atol=1e-6)
    assert [e.safe_targets is None for p, e in d.entries.items() if p != POOLED] == [True]
    summary = build(store, str(tmp_path / "e.safetensors"), BuildConfig(**cfg, pooled=False), str(tmp_path / "w2"),
                    progress=False)
    assert "input.pooled" not in summary["positions"]


@pytest.mark.comfy
def test_the_pooled_vector_follows_the_text_detector_from_the_second_step(flux):
    """The pooled vector is consumed before the first block, where the text detector decides: it takes the
    decision of the previous model call of the run (none at a run's first step, where its own SAE fires on
    nothing here), cond rows only, and a new run forgets the last one's decision."""
    from safedig_core.adapters.comfy import runtime as comfyui
    from safedig_core.adapters.comfy.patches import SharedSteerers

    text = parse("double.0.txt")
    d = make_dictionary("flux", VEC, ["input.pooled"], fire=False)
    entries = {**d.entries, **make_dictionary("flux", 64, [text.name], fire=True).entries}
    steerers = {p: e.steerer() for p, e in entries.items()}
    safe = torch.randn(1, VEC, generator=torch.Generator().manual_seed(9))
    steerers[POOLED].targets = safe
    cfg = SteeringConfig(blend=1.0, gate="image", detect=text.name, threshold=0.5)
    steered = comfyui.steer_model(flux, SharedSteerers(steerers), [POOLED], cfg)
    seen = []
    watched = comfyui.recording_model(steered, [POOLED], lambda p, x, to: seen.append((x.clone(), to["cond_or_uncond"])))
    pos, neg = (c[0][1]["pooled_output"][0] for c in _conds())
    for _ in range(2):
        seen.clear()
        _run(watched)
        assert len(seen) == 3
        for step, (x, order) in enumerate(seen):
            for row, which in enumerate(order):
                want = neg if which == 1 else (pos if step == 0 else safe[0])
                assert torch.equal(x[row, 0], want.to(x.dtype)), (step, which)
