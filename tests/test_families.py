"""FLUX.1 (dev, schnell), Chroma, Flux.2, Qwen-Image, Wan 2.1, HunyuanImage 2.1, Lumina 2 / Z-Image and HiDream in
the real ComfyUI: tiny random-weight models,
real KSampler runs.

Chroma and Flux.2 subclass ComfyUI's Flux model and carry its block attributes; the family comes from the
model's class, and a dictionary made on one is refused on another with a message naming both.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_dictionary

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.families import identify
from safedig_core.adapters.comfy.patches import SharedSteerers
from safedig_core.formats.dictionary import DictionaryError
from safedig_core.positions import PositionError, parse
from safedig_core.steering import SteeringConfig

pytestmark = pytest.mark.comfy

W = 64
# family -> (builder, variant, latent shape, pooled width or None, guidance, text tokens in the DiT)
MODELS = {
    "flux": (comfyui.tiny_flux, "Flux", (16, 8, 8), 768, 3.5, 8),
    "flux-schnell": (comfyui.tiny_flux_schnell, "FluxSchnell", (16, 8, 8), 768, None, 8),
    "chroma": (comfyui.tiny_chroma, "Chroma", (16, 8, 8), None, 0.0, 8),
    "flux2": (comfyui.tiny_flux2, "Flux2", (128, 4, 4), None, 3.5, 512),  # ComfyUI left-pads Flux.2 text to 512
    "qwen_image": (comfyui.tiny_qwen_image, "QwenImage", (16, 1, 8, 8), None, None, 8),
    "wan": (comfyui.tiny_wan, "WAN21_T2V", (16, 1, 8, 8), None, None, 8),
    "hunyuan_image": (comfyui.tiny_hunyuan_image, "HunyuanImage21", (64, 4, 4), None, None, 8),  # 32x latents
    "lumina2": (comfyui.tiny_lumina2, "Lumina2", (16, 8, 8), None, None, 8),
    "lumina2-z_image": (comfyui.tiny_z_image, "ZImage", (16, 8, 8), None, None, 8),  # pads (not positions) excluded
    "hidream": (comfyui.tiny_hidream, "HiDream", (16, 8, 8), 64, None, 16),  # text: 8 T5 + 8 Llama tokens
}
BLOCKS = {"qwen_image": {"double": 2}, "wan": {"double": 2}, "lumina2": {"single": 2}, "lumina2-z_image": {"single": 2}}
WIDTHS = {"lumina2-z_image": 256}  # Z-Image's timestep embedding needs a width of 256 or more
LUMINA = ["single.0.img", "single.0.txt", "single.1.img"]
POSITIONS = {"qwen_image": ["double.0.img", "double.0.txt", "double.1.img"], "wan": ["double.0.img", "double.1.img"],
             "lumina2": LUMINA, "lumina2-z_image": LUMINA}
FLUX_STYLE = ["double.0.img", "double.1.txt", "single.0.img", "single.0.txt"]


def positions_of(name: str) -> list[str]:
    return POSITIONS.get(name, FLUX_STYLE)


@pytest.fixture(scope="module")
def models(comfy):
    return {name: spec[0](seed=3) for name, spec in MODELS.items()}


def width_of(name: str) -> int:
    return WIDTHS.get(name, W)


def family_of(name: str) -> str:
    return name.split("-")[0]


def conds(name: str):
    _, _, _, pooled, guidance, _ = MODELS[name]
    g = torch.Generator().manual_seed(5)
    extra = {} if guidance is None else {"guidance": guidance}

    def one(scale):
        y = None if pooled is None else torch.randn(1, pooled, generator=g) * scale
        more = {"conditioning_llama3": torch.randn(1, 4, 8, 64, generator=g) * scale} if name == "hidream" else {}
        return comfyui.conditioning(torch.randn(1, 8, 64, generator=g) * scale, y, **extra, **more)

    return one(1.0), one(0.1)


def run(model, name: str, steps: int = 2) -> torch.Tensor:
    shape = MODELS[name][2]
    pos, neg = conds(name)
    with torch.inference_mode():  # as ComfyUI's executor runs KSampler
        return comfyui.sample(model, pos, neg, torch.zeros(1, *shape), seed=7, steps=steps, cfg=2.0)


@pytest.mark.parametrize("name", MODELS)
def test_family_and_variant_come_from_the_model_class(models, name):
    model = models[name]
    family, variant = family_of(name), MODELS[name][1]
    assert identify(model) == (family, variant)
    layout = comfyui.layout_of(model)
    blocks = BLOCKS.get(name, {"double": 2, "single": 2})
    assert (layout.family, layout.variant, layout.width, layout.blocks) == (family, variant, width_of(name), blocks)
    text_input = ["input.txt"] if family in ("flux", "chroma", "flux2") else []
    text_input += ["input.pooled"] if family == "flux" else []
    assert [str(p) for p in layout.positions()] == text_input + [
        f"{k}.{i}.{s}" for k in blocks for i in range(blocks[k]) for s in ("img", "txt")
        if s == "img" or (family != "wan" and not (k == list(blocks)[-1] and i == blocks[k] - 1))]
    dm = model.get_model_object("diffusion_model")
    if blocks.keys() == {"double", "single"} and name != "hidream":  # what used to make every one of them "flux"
        assert hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks")
    # a bare diffusion model has only its ldm class: Flux.2 shares FLUX.1's, so it reads as FLUX there
    assert identify(dm)[0] == ("flux" if family == "flux2" else family)


@pytest.mark.parametrize("name", MODELS)
def test_positions_and_token_counts_in_a_ksampler_run(models, name):
    shape, txt = MODELS[name][2], MODELS[name][5]
    patch = models[name].get_model_object("diffusion_model").patch_size
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    img = (shape[-1] // patch) ** 2
    seen = {}

    def record(p, x, to):
        seen.setdefault(str(p), set()).add(tuple(x.shape))

    m = comfyui.recording_model(models[name], [parse(n) for n in positions_of(name)], record)
    run(m, name)
    assert seen == {n: {(2, txt if n.endswith("txt") else img, width_of(name))} for n in positions_of(name)}


@pytest.mark.parametrize("name", MODELS)
def test_identity_at_zero_effect_only_when_harmful_latents_fire_input_unchanged(models, name):
    model, family = models[name], family_of(name)
    before = dict(model.model_options["transformer_options"])
    base = run(model, name)
    positions = [parse(n) for n in positions_of(name)]

    def steered(fire: bool, cfg: SteeringConfig) -> torch.Tensor:
        d = make_dictionary(family, width_of(name), positions_of(name), fire=fire)
        store = SharedSteerers({p: e.steerer() for p, e in d.entries.items()})
        d.check_layout(comfyui.layout_of(model))
        return run(comfyui.steer_model(model, store, positions, cfg), name)

    full = SteeringConfig(blend=1.0, repel=1.0, threshold=0.0)
    assert torch.equal(steered(True, SteeringConfig(blend=0.0, repel=0.0)), base), "α = β = 0 must be the identity"
    assert torch.equal(steered(False, full), base), "nothing fires, so nothing may change"
    assert (steered(True, full) - base).abs().max() > 1e-3, "firing harmful latents must steer"
    assert model.model_options["transformer_options"] == before and torch.equal(run(model, name), base)


@pytest.mark.parametrize("made, model_name, message", [
    ("flux", "chroma", r"made for FLUX, but the model is CHROMA \(Chroma\)"),
    ("chroma", "flux", r"made for CHROMA, but the model is FLUX \(Flux\)"),
    ("flux", "flux2", r"made for FLUX, but the model is FLUX2 \(Flux2\)"),
    ("flux2", "flux", r"made for FLUX2, but the model is FLUX \(Flux\)"),
    ("flux", "qwen_image", r"made for FLUX, but the model is QWEN_IMAGE \(QwenImage\)"),
    ("qwen_image", "wan", r"made for QWEN_IMAGE, but the model is WAN \(WAN21_T2V\)"),
    ("flux", "hunyuan_image", r"made for FLUX, but the model is HUNYUAN_IMAGE \(HunyuanImage21\)"),
    ("hunyuan_image", "flux", r"made for HUNYUAN_IMAGE, but the model is FLUX \(Flux\)"),
    ("flux", "lumina2", r"made for FLUX, but the model is LUMINA2 \(Lumina2\)"),
    ("hunyuan_image", "hidream", r"made for HUNYUAN_IMAGE, but the model is HIDREAM \(HiDream\)"),
])
def test_a_dictionary_is_refused_on_another_family(models, made, model_name, message):
    """Same block counts and widths: only the family tells them apart."""
    d = make_dictionary(made, W, ["double.0.img"])
    with pytest.raises(DictionaryError, match=message):
        d.check_layout(comfyui.layout_of(models[model_name]))


def test_a_dictionary_is_refused_on_another_variant_and_accepted_on_its_own(models):
    d = make_dictionary("flux", W, ["double.0.img"])
    d.variant = "FluxSchnell"
    with pytest.raises(DictionaryError, match=r"made for FLUX \(FluxSchnell\), but the model is FLUX \(Flux\)"):
        d.check_layout(comfyui.layout_of(models["flux"]))
    d.check_layout(comfyui.layout_of(models["flux-schnell"]))
    d.variant = None  # a dictionary that names no variant fits every variant of its family
    d.check_layout(comfyui.layout_of(models["flux"]))


def test_wan_has_no_text_positions(models):
    layout = comfyui.layout_of(models["wan"])
    with pytest.raises(PositionError, match=r"double\.0\.txt: WAN blocks return no txt stream"):
        layout.check(parse("double.0.txt"))


def test_the_wrappers_cached_signatures_bind_as_inspect_does():
    """The DIFFUSION_MODEL wrappers bind each call's arguments through a signature cached per function: for a
    plain function, a bound method and a callable object it binds exactly as `inspect.signature` would."""
    import inspect

    from safedig_core.adapters.comfy.families import _signature

    class Net:
        def _forward(self, x, timestep, context=None, transformer_options=None, **kwargs):
            return x

        def __call__(self, a, b=2):
            return a

    def plain(x, *rest, transformer_options=None):
        return x

    for fn in (Net()._forward, Net()._forward, Net(), plain):
        for args, kwargs in [((1, 2), {"context": 3}), ((1,), {"transformer_options": {}}), ((1, 2, 3, 4), {})]:
            try:
                want = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
            except TypeError:
                with pytest.raises(TypeError):
                    _signature(fn).bind_partial(*args, **kwargs)
                continue
            assert _signature(fn).bind_partial(*args, **kwargs).arguments == want
