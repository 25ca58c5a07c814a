"""How SafeDIG's hooks sit in each family's forward, in the real ComfyUI with tiny random-weight models: a
foreign patch on the same block keeps working under steering, the sampler window and the cond/uncond choice
take effect, single-stream spans are the family's own token order, and NextDiT's block slots are views of the
layers they stand in for (same parameters and names; the shared model untouched).
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_dictionary
from test_families import MODELS, family_of, positions_of, run, width_of

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.patches import SharedSteerers
from safedig_core.adapters.comfy.shim import BlockSlot
from safedig_core.positions import parse
from safedig_core.steering import SteeringConfig

pytestmark = pytest.mark.comfy

FULL = dict(blend=1.0, repel=1.0, threshold=0.0)


@pytest.fixture(scope="module")
def models(comfy):
    return {name: spec[0](seed=3) for name, spec in MODELS.items()}


def steer(model, name: str, cfg: SteeringConfig, positions=None):
    names = positions or positions_of(name)
    d = make_dictionary(family_of(name), width_of(name), names)
    store = SharedSteerers({p: e.steerer() for p, e in d.entries.items()})
    return comfyui.steer_model(model, store, [parse(n) for n in names], cfg)


# families without a block-replace protocol: (first steered block, single block 0) as module paths
SHIMMED_PATHS = {"lumina2": ("diffusion_model.layers.0", "diffusion_model.layers.0"),
                 "lumina2-z_image": ("diffusion_model.layers.0", "diffusion_model.layers.0"),
                 "hidream": ("diffusion_model.double_stream_blocks.0", "diffusion_model.single_stream_blocks.0")}


class Foreign(torch.nn.Module):
    """Another node's object patch on a block: scales the block's (image) output."""

    def __init__(self, inner, calls):
        super().__init__()
        self.__dict__["inner"], self.__dict__["calls"] = inner, calls

    def forward(self, *args, **kwargs):
        self.calls.append(1)
        out = self.inner(*args, **kwargs)
        return (out[0] * 1.01, *out[1:]) if isinstance(out, tuple) else out * 1.01


def with_foreign(model, name: str, calls: list):
    """A clone carrying another node's patch on the block of the first steered position."""
    m = model.clone()
    p = parse(positions_of(name)[0])
    if name in SHIMMED_PATHS:
        path = SHIMMED_PATHS[name][0]  # block 0: the first steered position's (positions_of)
        assert p.index == 0
        m.add_object_patch(path, Foreign(m.get_model_object(path), calls))
        return m

    def foreign(args, extra):
        calls.append(1)
        out = dict(extra["original_block"](args))
        out["img"] = out["img"] * 1.01
        return out

    m.set_model_patch_replace(foreign, "dit", *p.slot)
    return m


@pytest.mark.parametrize("name", MODELS)
def test_a_foreign_patch_on_the_same_block_keeps_working(models, name):
    calls = []
    foreign = with_foreign(models[name], name, calls)
    only_foreign = run(foreign, name)
    assert calls and not torch.equal(only_foreign, run(models[name], name))
    calls.clear()
    assert torch.equal(run(steer(foreign, name, SteeringConfig()), name), only_foreign) and calls
    assert not torch.equal(run(steer(foreign, name, SteeringConfig(**FULL)), name), only_foreign)


@pytest.mark.parametrize("name", MODELS)
def test_window_and_cond_uncond(models, name):
    model = models[name]
    base, full = run(model, name, steps=4), run(steer(model, name, SteeringConfig(**FULL)), name, steps=4)
    late = run(steer(model, name, SteeringConfig(**FULL, start=0.5)), name, steps=4)
    assert not torch.equal(late, base) and not torch.equal(late, full)
    assert torch.equal(run(steer(model, name, SteeringConfig(**FULL, start=0.9, end=0.95)), name, steps=4), base)
    cond = run(steer(model, name, SteeringConfig(**FULL, apply_to="cond")), name, steps=4)
    uncond = run(steer(model, name, SteeringConfig(**FULL, apply_to="uncond")), name, steps=4)
    assert not torch.equal(cond, base) and not torch.equal(uncond, base) and not torch.equal(cond, uncond)


# single-stream families: (where the text starts, where the image starts, text tokens) in the block's
# sequence, as the family's forward builds it (img = 16 tokens; HiDream's text: 8 T5 + 8 Llama, then the
# block's own 8 Llama-layer tokens, which are no position)
ORDER = {"flux": (0, 8, 8), "hunyuan_image": (16, 0, 8), "lumina2": (0, 8, 8), "lumina2-z_image": (0, 32, 8),
         "hidream": (16, 0, 16)}


@pytest.mark.parametrize("name", ORDER)
def test_single_stream_spans_follow_the_family_token_order(models, name):
    """A foreign patch sees the whole single-block sequence; SafeDIG's txt and img are its own slices."""
    full, seen = [], {}
    model = models[name].clone()
    if name in SHIMMED_PATHS:
        class Capture(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.__dict__["inner"] = inner

            def forward(self, *args, **kwargs):
                out = self.inner(*args, **kwargs)
                full.append(out.clone())
                return out

        path = SHIMMED_PATHS[name][1]
        model.add_object_patch(path, Capture(model.get_model_object(path)))
    else:
        def capture(args, extra):
            out = extra["original_block"](args)
            full.append(out["img"].clone())
            return out

        model.set_model_patch_replace(capture, "dit", "single_block", 0)
    rec = comfyui.recording_model(model, [parse("single.0.txt"), parse("single.0.img")],
                                  lambda p, x, to: seen.setdefault(str(p), []).append(x.clone()))
    run(rec, name, steps=1)
    txt, img, n = ORDER[name]
    assert len(full) == 1 and full[0].shape[1] >= 16 + n
    assert torch.equal(seen["single.0.txt"][0], full[0][:, txt:txt + n])
    assert torch.equal(seen["single.0.img"][0], full[0][:, img:img + 16])


@pytest.mark.parametrize("name", SHIMMED_PATHS)
def test_block_slots_are_views_and_leave_the_shared_model_alone(models, name):
    """ComfyUI applies a clone's object patches while that clone is loaded and restores them when another
    ModelPatcher of the same model loads: the slot is in the tree only while the steered clone runs."""
    import comfy.utils

    model = models[name]
    path = SHIMMED_PATHS[name][0]
    run(model, name)  # the plain model loaded: its own blocks in the tree
    layer, names = comfy.utils.get_attr(model.model, path), [n for n, _ in model.model.named_parameters()]
    assert not isinstance(layer, BlockSlot)
    m = steer(model, name, SteeringConfig(**FULL))
    slot = m.object_patches[path]
    assert isinstance(slot, BlockSlot) and slot.inner is layer
    assert dict(slot.named_parameters()).keys() == dict(layer.named_parameters()).keys()
    assert all(a is b for a, b in zip(slot.parameters(), layer.parameters()))
    assert not model.object_patches  # the input MODEL carries no slot
    run(m, name)
    assert comfy.utils.get_attr(model.model, path) is slot
    assert [n for n, _ in model.model.named_parameters()] == names  # the same parameter names
    run(model, name)
    assert comfy.utils.get_attr(model.model, path) is layer  # restored when the plain model loads again
    again = steer(m, name, SteeringConfig(**FULL))  # chained SafeDIG nodes share one slot per block
    assert again.object_patches[path] is slot

CTX = 48  # the text encoder's width, unlike the DiT's (64): input.txt has the encoder's
TEXT_INPUT = {"flux": comfyui.tiny_flux, "chroma": comfyui.tiny_chroma, "flux2": comfyui.tiny_flux2}


@pytest.fixture(scope="module")
def text_models(comfy):
    return {name: make(seed=3, context_dim=CTX) for name, make in TEXT_INPUT.items()}


def text_conds(name: str):
    _, _, _, pooled, guidance, _ = MODELS[name]
    g = torch.Generator().manual_seed(5)
    extra = {} if guidance is None else {"guidance": guidance}
    return [comfyui.conditioning(torch.randn(1, 8, CTX, generator=g) * s,
                                 None if pooled is None else torch.randn(1, pooled, generator=g), **extra)
            for s in (1.0, 0.1)]


def run_text(model, name: str, steps: int = 2) -> torch.Tensor:
    pos, neg = text_conds(name)
    with torch.inference_mode():
        return comfyui.sample(model, pos, neg, torch.zeros(1, *MODELS[name][2]), seed=7, steps=steps, cfg=2.0)


def steer_text(model, name: str, cfg: SteeringConfig, fire: bool = True, seed: int = 0):
    d = make_dictionary(name, CTX, ["input.txt"], fire=fire, seed=seed)
    d.check_layout(comfyui.layout_of(model))
    store = SharedSteerers({p: e.steerer() for p, e in d.entries.items()})
    return comfyui.steer_model(model, store, [parse("input.txt")], cfg)


@pytest.mark.parametrize("name", TEXT_INPUT)
def test_text_input_is_the_conditioning_as_the_dit_receives_it(text_models, name):
    model = text_models[name]
    layout = comfyui.layout_of(model)
    assert layout.positions()[0] == parse("input.txt") and layout.width_of(parse("input.txt")) == CTX
    seen = []
    run_text(comfyui.recording_model(model, [parse("input.txt")], lambda p, x, to: seen.append((x.clone(), to["cond_or_uncond"]))), name)
    pos, neg = (c[0][0][0] for c in text_conds(name))
    tokens = MODELS[name][5]  # Flux.2: left-padded to 512 by ComfyUI before the DiT
    for x, order in seen:
        assert x.shape == (2, tokens, CTX)
        for row, which in enumerate(order):
            assert torch.equal(x[row, tokens - 8:], (pos if which == 0 else neg).to(x.dtype))


@pytest.mark.parametrize("name", TEXT_INPUT)
def test_text_input_steering_properties(text_models, name):
    model = text_models[name]
    before = dict(model.model_options["transformer_options"])
    base = run_text(model, name, steps=4)
    full = SteeringConfig(**FULL)
    assert torch.equal(run_text(steer_text(model, name, SteeringConfig()), name, steps=4), base)
    assert torch.equal(run_text(steer_text(model, name, full, fire=False), name, steps=4), base)
    steered = run_text(steer_text(model, name, full), name, steps=4)
    assert (steered - base).abs().max() > 1e-3
    late = run_text(steer_text(model, name, SteeringConfig(**FULL, start=0.5)), name, steps=4)
    assert not torch.equal(late, base) and not torch.equal(late, steered)
    cond = run_text(steer_text(model, name, SteeringConfig(**FULL, apply_to="cond")), name, steps=4)
    uncond = run_text(steer_text(model, name, SteeringConfig(**FULL, apply_to="uncond")), name, steps=4)
    assert not torch.equal(cond, base) and not torch.equal(uncond, base) and not torch.equal(cond, uncond)
    chained = steer_text(steer_text(model, name, full), name, full, seed=1)  # both installations act
    assert not torch.equal(run_text(chained, name, steps=4), steered)
    assert model.model_options["transformer_options"] == before and torch.equal(run_text(model, name, steps=4), base)


def test_text_input_is_refused_where_it_is_not_hooked(models):
    from safedig_core.positions import PositionError

    with pytest.raises(PositionError, match=r"input\.txt: SafeDIG does not hook the text input of QWEN_IMAGE \(QwenImage\)"):
        comfyui.layout_of(models["qwen_image"]).check(parse("input.txt"))


def test_text_input_position_names_order_and_file_round_trip(tmp_path):
    from safedig_core.formats import dictionary
    from safedig_core.positions import ModelLayout, block_number, depth, group

    p = parse("input.txt")
    assert p.name == "input.txt" and parse(p.name) == p
    assert p.call_order < parse("double.0.img").call_order < parse("single.0.txt").call_order
    assert p.belongs("flux") and p.belongs("flux2") and not p.belongs("sd3") and not p.belongs("wan")
    layout = ModelLayout("flux", {"double": 2, "single": 2}, 64, input_width=CTX)
    assert (block_number(p, layout), depth(p, layout), group(p, layout)) == (-1, 0.0, "text_binding")
    assert not ModelLayout("flux", {"double": 2, "single": 2}, 64).has(p)  # no width known: not a position
    d = make_dictionary("flux", CTX, ["input.txt", "double.0.img"])
    d.entries[parse("double.0.img")] = make_dictionary("flux", 64, ["double.0.img"]).entries[parse("double.0.img")]
    path = str(tmp_path / "d.safetensors")
    dictionary.save(d, path)
    back = dictionary.load(path)
    assert sorted(map(str, back.entries)) == ["double.0.img", "input.txt"]
    back.check_layout(layout)
