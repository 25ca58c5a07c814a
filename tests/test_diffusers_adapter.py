"""The diffusers adapter on tiny random-weight diffusers transformers of every family it hooks (FLUX.1, SD3, Chroma,
Flux.2, Qwen-Image, Wan 2.x, HunyuanImage 2.1, Lumina 2, Z-Image, HiDream), against the ComfyUI path.

The ComfyUI models are the same weights under ComfyUI's names (`diffusers_weights.to_comfy`: ComfyUI's own
diffusers→ComfyUI key map for FLUX.1 and SD3, the test's own for the others). The shared property tests run one
model call through either adapter (`Adapter.run`); the cross-adapter tests compare the two on equal inputs.

Chroma: ComfyUI 0.3.75 computes a fixed 344 modulation vectors (Chroma's 19 double and 38 single blocks) and
takes the final layer's from the end of them; diffusers computes as many as the blocks use. With the 2 + 2
blocks here every block output agrees, the model output does not (measured: 0.85 max abs on outputs up to
1.8 in size); with 2 + 106 blocks (344 modulations again) the model output agrees too
(`test_chroma_model_output_agrees_at_comfyuis_modulation_count`).

Measured unsteered, before these tests were written (batch 2, outputs up to 1.4 to 4.0 in size): HunyuanImage and
HiDream agree to 2e-6 max abs, Lumina 2 to 5e-5 and Z-Image to 3e-5 (ComfyUI's NextDiT normalises q and k with
torch's default eps, diffusers with 1e-5). The runtimes order some tokens differently - Z-Image's joint sequence
is [image | caption] in diffusers and [caption | image] in ComfyUI, HunyuanImage's byT5 text comes first in
diffusers and last in ComfyUI - which attention does not see; the streams compared are each runtime's own
text and image tokens. Tiny Z-Image: diffusers fixes the timestep MLP's middle width at 1024 and ComfyUI at
min(width, 1024), equal at Z-Image's 3840; the tiny diffusers model takes ComfyUI's (`tiny_diffusers`).
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import make_dictionary
from diffusers_weights import to_comfy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.adapters.comfy.patches import SharedSteerers
from safedig_core.adapters.diffusers.hooks import HALVES, layout_of, record, steer
from safedig_core.formats.dictionary import DictionaryError, save
from safedig_core.positions import PositionError, parse, parse_list
from safedig_core.sae import SparseAutoencoder
from safedig_core.steering import PositionSteerer, SteeringConfig

diffusers = pytest.importorskip("diffusers")

# the tiny models, by name: each family's, and Z-Image (Lumina 2's family, variant ZImage)
FAMILIES = ["flux", "sd3", "chroma", "flux2", "qwen_image", "wan", "hunyuan_image", "lumina2", "z_image", "hidream"]
FAMILY = {"z_image": "lumina2"}
FLUX_STYLE = ("flux", "chroma", "flux2")
WIDTH = {f: {"sd3": 128, "z_image": 384}.get(f, 64) for f in FAMILIES}  # Z-Image: see tiny_diffusers
TXT, SIDE, IMG, CTX = 5, 8, 16, 32  # text tokens; an 8×8 latent in 2×2 patches (Flux.2: 4×4 in 1×1) gives 16 image tokens
LLAMA = 4  # HiDream's Llama layers; its text stream is [T5 | last Llama layer], 2 × TXT tokens
FLUX_ALL = ["double.0.img", "double.0.txt", "double.1.img", "double.1.txt", "single.0.img", "single.0.txt", "single.1.img"]
NEXTDIT = ["single.0.img", "single.0.txt", "single.1.img"]
ALL = {"flux": FLUX_ALL, "chroma": FLUX_ALL, "flux2": FLUX_ALL, "sd3": ["joint.0.img", "joint.0.txt", "joint.1.img"],
       "qwen_image": ["double.0.img", "double.0.txt", "double.1.img"], "wan": ["double.0.img", "double.1.img"],
       "hunyuan_image": FLUX_ALL, "lumina2": NEXTDIT, "z_image": NEXTDIT, "hidream": FLUX_ALL}
TEXT = [f for f in FAMILIES if f != "wan"]  # Wan's blocks return no text stream
NEGATED = ("lumina2", "z_image", "hidream")  # ComfyUI's module returns the negated prediction


def family_of(name: str) -> str:
    return FAMILY.get(name, name)


def tiny_diffusers(family: str, single: int = 2):
    torch.manual_seed(FAMILIES.index(family))
    if family == "flux":  # in_channels 64 = ComfyUI's 16 latent channels in 2×2 patches; head 32 = RoPE 4+14+14
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                             attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CTX,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 14, 14))
    elif family == "sd3":  # ComfyUI's MMDiT has width 64·depth and depth heads
        m = diffusers.SD3Transformer2DModel(sample_size=SIDE, patch_size=2, in_channels=16, num_layers=2,
                                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=CTX,
                                            caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                                            pos_embed_max_size=64)
    elif family == "chroma":
        m = diffusers.ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=single,
                                               attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CTX,
                                               axes_dims_rope=(4, 14, 14), approximator_num_channels=64,
                                               approximator_hidden_dim=32, approximator_layers=1)
    elif family == "flux2":  # 128 latent channels, patch 1; RoPE over 4 axes (time, h, w, text index)
        m = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=2, num_single_layers=2,
                                              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=CTX,
                                              timestep_guidance_channels=256, axes_dims_rope=(8, 8, 8, 8))
    elif family == "qwen_image":
        m = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                  attention_head_dim=32, num_attention_heads=2,
                                                  joint_attention_dim=CTX, axes_dims_rope=(4, 14, 14))
    elif family == "wan":
        m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                            in_channels=16, out_channels=16, text_dim=CTX, freq_dim=256, ffn_dim=128,
                                            num_layers=2)
    elif family == "hunyuan_image":  # 64 latent channels at 32× downsampling, patch 1; RoPE over (row, column)
        m = diffusers.HunyuanImageTransformer2DModel(in_channels=64, out_channels=64, num_attention_heads=2,
                                                     attention_head_dim=32, num_layers=2, num_single_layers=single,
                                                     num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=CTX,
                                                     rope_axes_dim=(16, 16))
    elif family == "lumina2":  # ComfyUI's FFN width: 4 × width, rounded up to 16
        m = diffusers.Lumina2Transformer2DModel(patch_size=2, in_channels=16, hidden_size=64, num_layers=2,
                                                num_refiner_layers=1, num_attention_heads=2, num_kv_heads=2,
                                                multiple_of=16, axes_dim_rope=(12, 10, 10), cap_feat_dim=CTX)
    elif family == "z_image":  # width 384: Z-Image's FFN (8/3 × width) needs no rounding in ComfyUI's
        from diffusers.models.transformers.transformer_z_image import TimestepEmbedder

        m = diffusers.ZImageTransformer2DModel(in_channels=16, dim=384, n_layers=2, n_refiner_layers=1, n_heads=4,
                                               n_kv_heads=4, cap_feat_dim=CTX, axes_dims=[24, 36, 36],
                                               axes_lens=[1536, 512, 512])
        m.t_embedder = TimestepEmbedder(256, mid_size=384)  # ComfyUI's middle width, min(384, 1024)
    else:
        m = diffusers.HiDreamImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                                     num_single_layers=single, attention_head_dim=32,
                                                     num_attention_heads=2, caption_channels=[CTX, CTX],
                                                     text_emb_dim=32, axes_dims_rope=(16, 8, 8), max_resolution=(32, 32),
                                                     llama_layers=list(range(LLAMA)))
    if family in ("hunyuan_image", "lumina2", "z_image", "hidream"):
        _init_norms(m)
    return m.eval().requires_grad_(False)


def _init_norms(m):
    """diffusers initialises norm scales to 1 and pad tokens to 0; random values let a wrong map fail."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "pad_token" in name or (p.ndim == 1 and "norm" in name and name.endswith("weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def tiny_comfy(family: str, single: int = 2):
    """ComfyUI's model of `family` in the shape of `tiny_diffusers(family)` (its own random weights)."""
    flux_style = dict(depth=2, single=single, hidden=64, heads=2, context_dim=CTX)
    return {"flux": lambda: comfyui.tiny_flux(**flux_style, vec_dim=32),
            "sd3": lambda: comfyui.tiny_sd3(depth=2, context_dim=CTX, adm_dim=32),
            "chroma": lambda: comfyui.tiny_chroma(**flux_style),
            "flux2": lambda: comfyui.tiny_flux2(**flux_style),
            "qwen_image": lambda: comfyui.tiny_qwen_image(layers=2, heads=2, head_dim=32, context_dim=CTX),
            "wan": lambda: comfyui.tiny_wan(layers=2, dim=64, heads=2, context_dim=CTX),
            "hunyuan_image": lambda: comfyui.tiny_hunyuan_image(**flux_style),
            "lumina2": lambda: comfyui.tiny_lumina2(layers=2, dim=64, heads=2, context_dim=CTX),
            "z_image": lambda: comfyui.tiny_z_image(layers=2, dim=384, heads=4, context_dim=CTX),
            "hidream": lambda: comfyui.tiny_hidream(depth=2, single=single, heads=2, head_dim=32, context_dim=CTX,
                                                    llama_layers=LLAMA)}[family]()


def same_weights(family: str, model):
    """A ComfyUI ModelPatcher of `family` carrying the weights of diffusers transformer `model`."""
    singles = getattr(model, "single_transformer_blocks", getattr(model, "single_stream_blocks", ()))
    patcher = tiny_comfy(family, single=len(singles) or 2)
    patcher.model.diffusion_model.load_state_dict(to_comfy(family, model), strict=True)
    return patcher


@pytest.fixture(scope="module")
def dmodels():
    return {f: tiny_diffusers(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def cmodels(comfy, dmodels):
    """The same weights in ComfyUI's model of each family."""
    return {family: same_weights(family, m) for family, m in dmodels.items()}


def latent_shape(family: str) -> tuple:
    if family == "hunyuan_image":
        return (64, SIDE // 2, SIDE // 2)
    return (128, SIDE // 2, SIDE // 2) if family == "flux2" else (16, SIDE, SIDE)


def inputs(family: str, batch: int = 1, sigma: float = 0.7, seed: int = 0) -> dict:
    """One call's inputs, batch first (HiDream's Llama states [B, layers, T, C] as ComfyUI's conditioning)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, *latent_shape(family), generator=g), "ctx": torch.randn(batch, TXT, CTX, generator=g),
            "y": torch.randn(batch, 32, generator=g), "sigma": torch.full((batch,), sigma),
            "guidance": torch.full((batch,), 3.5), "llama": torch.randn(batch, LLAMA, TXT, CTX, generator=g)}


def pack(x):
    """Latents [B, C, H, W] → tokens [B, HW/4, 4C], as diffusers' pipelines and ComfyUI patchify 2×2."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def tokens(family: str, x):
    """The latent as the diffusers transformer takes it: 2×2 patches (Flux.2: 1×1), Wan a video of one frame."""
    if family == "flux2":
        return x.flatten(2).transpose(1, 2)
    if family == "wan":
        return x[:, :, None]
    return pack(x) if family != "sd3" else x


def rope_ids(family: str, ref: int = 0):
    """diffusers' FLUX-style image and text ids: (index, row, column[, text index]); a reference image's index
    is `ref` (FLUX.1 Kontext: 1, Flux.2: 10)."""
    side, axes = latent_shape(family)[-1] // (1 if family == "flux2" else 2), 4 if family == "flux2" else 3
    ids = torch.zeros(side, side, axes)
    ids[..., 0] = ref
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    txt = torch.zeros(TXT, axes)
    if family == "flux2":
        txt[:, 3] = torch.arange(TXT)
    return ids.reshape(-1, axes), txt


def dforward(model, family, inp, refs=None):
    """One diffusers transformer call; `refs`: reference latents (FLUX.1, Flux.2, Qwen-Image), whose tokens follow
    the output image's as their pipelines put them (the output returned is the output image's)."""
    x, ctx, sigma = inp["x"], inp["ctx"], inp["sigma"]
    dev = x.device
    with torch.no_grad():
        if family == "sd3":
            return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=inp["y"],
                         timestep=sigma * 1000, return_dict=False)[0]
        if family == "wan":
            return model(hidden_states=tokens(family, x), timestep=sigma * 1000, encoder_hidden_states=ctx,
                         return_dict=False)[0]
        if family == "hunyuan_image":
            return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=ctx,
                         encoder_attention_mask=torch.ones(ctx.shape[:2], device=dev), return_dict=False)[0]
        if family == "lumina2":  # its pipeline passes 1 - t / 1000
            return model(hidden_states=x, timestep=1 - sigma, encoder_hidden_states=ctx,
                         encoder_attention_mask=torch.ones(ctx.shape[:2], dtype=torch.long, device=dev),
                         return_dict=False)[0]
        if family == "z_image":  # lists of [C, frames, H, W] latents and [T, C] captions
            out = model(list(x[:, :, None].unbind(0)), 1 - sigma, list(ctx.unbind(0)), return_dict=False)[0]
            return torch.stack(out)[:, :, 0]
        if family == "hidream":
            return model(hidden_states=x, timesteps=sigma * 1000, encoder_hidden_states_t5=ctx,
                         encoder_hidden_states_llama3=inp["llama"].movedim(1, 0), pooled_embeds=inp["y"],
                         return_dict=False)[0]
        hidden = torch.cat([tokens(family, t) for t in [x, *(refs or [])]], dim=1)
        if family == "qwen_image":
            shapes = [[(1, SIDE // 2, SIDE // 2)] * (1 + len(refs or []))] * x.shape[0]
            out = model(hidden_states=hidden, encoder_hidden_states=ctx, timestep=sigma, img_shapes=shapes,
                        return_dict=False)[0]
        else:
            img_ids, txt_ids = rope_ids(family)
            ref_ids = [rope_ids(family, ref=(10 if family == "flux2" else 1) * (i + 1))[0] for i in range(len(refs or []))]
            kw = {"img_ids": torch.cat([img_ids, *ref_ids]).to(dev), "txt_ids": txt_ids.to(dev)}
            if family == "flux":
                kw.update(pooled_projections=inp["y"], guidance=inp["guidance"])
            elif family == "flux2":
                kw["guidance"] = inp["guidance"]
            out = model(hidden_states=hidden, encoder_hidden_states=ctx, timestep=sigma, return_dict=False, **kw)[0]
        return out[:, :IMG]


def cforward(dm, family, inp, to, refs=None):
    """The same call of ComfyUI's diffusion model, its output in diffusers' layout."""
    x, ctx, sigma = inp["x"], inp["ctx"], inp["sigma"]
    more = {"ref_latents": refs} if refs else {}
    with torch.no_grad():
        if family == "flux":
            return pack(dm(x, sigma, ctx, y=inp["y"], guidance=inp["guidance"], transformer_options=to, **more))
        if family == "chroma":
            return pack(dm(x, sigma, ctx, torch.zeros_like(sigma), transformer_options=to))
        if family == "flux2":
            return tokens(family, dm(x, sigma, ctx, guidance=inp["guidance"], transformer_options=to, **more))
        if family == "qwen_image":
            more = {"ref_latents": [r[:, :, None] for r in refs]} if refs else {}
            return pack(dm(x[:, :, None], sigma, ctx, transformer_options=to, **more)[:, :, 0])
        if family == "wan":
            return dm(x[:, :, None], sigma * 1000, ctx, transformer_options=to)
        if family == "hunyuan_image":
            return dm(x, sigma * 1000, ctx, transformer_options=to)
        if family in ("lumina2", "z_image"):
            return -dm(x, sigma, ctx, ctx.shape[1], transformer_options=to)
        if family == "hidream":
            return -dm(x, sigma * 1000, y=inp["y"], context=ctx, encoder_hidden_states_llama3=inp["llama"],
                       transformer_options=to)
        return dm(x, sigma * 1000, ctx, y=inp["y"], transformer_options=to)


@contextlib.contextmanager
def object_patches(patcher):
    """ComfyUI puts a clone's object patches (SafeDIG's block slots for NextDiT and HiDream) into the model while
    it loads the clone; a bare call of the diffusion model gets them here, and the model its blocks back after."""
    import comfy.utils

    old = {k: comfy.utils.set_attr(patcher.model, k, v) for k, v in patcher.object_patches.items()}
    try:
        yield
    finally:
        for k, v in old.items():
            comfy.utils.set_attr(patcher.model, k, v)


class Adapter:
    """One model call through one adapter: `run` steers with dictionary `d` (optional), records the streams
    at `rec` (names) and returns (output, {name: stream}). `steps` puts the call at progress
    (1 − sigma) of an n-step linear schedule; `halves` is the batch layout ("uncond", "cond")."""

    def __init__(self, name, family, model):
        self.name, self.family, self.model = name, family, model

    def run(self, inp, d=None, cfg=None, positions="all", rec=(), steps=None, halves=None, refs=None):
        raise NotImplementedError


class DiffusersAdapter(Adapter):
    def run(self, inp, d=None, cfg=None, positions="all", rec=(), steps=None, halves=None, refs=None):
        got = {}
        schedule = None if steps is None else 1000 * torch.linspace(1, 0, steps + 1)[:-1]
        with contextlib.ExitStack() as stack:
            if d is not None:
                stack.enter_context(steer(self.model, d, cfg, positions, schedule=schedule, halves=halves))
            if rec:
                stack.enter_context(record(self.model, list(rec),
                                           lambda p, x, info: got.__setitem__(p.name, x.clone())))
            out = dforward(self.model, self.family, inp, refs)
        return out, got


class ComfyAdapter(Adapter):
    def run(self, inp, d=None, cfg=None, positions="all", rec=(), steps=None, halves=None, refs=None):
        got = {}
        patcher = self.model
        layout = comfyui.layout_of(patcher)
        if d is not None:  # what the Apply Steering node does
            chosen = parse_list(positions if isinstance(positions, str) else ",".join(positions), d.positions)
            d.check_layout(layout, chosen)
            store = SharedSteerers({p: d.entries[p].steerer() for p in chosen})
            patcher = comfyui.steer_model(patcher, store, chosen, cfg, layout)
        if rec:
            patcher = comfyui.recording_model(patcher, [parse(n) for n in rec],
                                              lambda p, x, to: got.__setitem__(p.name, x.clone()), layout)
        to = dict(patcher.model_options["transformer_options"], wrappers=patcher.wrappers)
        if steps is not None:
            to["sample_sigmas"], to["sigmas"] = torch.linspace(1, 0, steps + 1), inp["sigma"]
        if halves is not None:
            to["cond_or_uncond"] = [HALVES[h] for h in halves]
        with object_patches(patcher):
            return cforward(patcher.model.diffusion_model, self.family, inp, to, refs), got


ADAPTERS = ["diffusers", pytest.param("comfy", marks=pytest.mark.comfy)]


@pytest.fixture
def adapter(request, dmodels):
    def make(name, family):
        if name == "diffusers":
            return DiffusersAdapter(name, family, dmodels[family])
        return ComfyAdapter(name, family, request.getfixturevalue("cmodels")[family])
    return make


def firing(family, names=None, **kw):
    return make_dictionary(family_of(family), WIDTH[family], names or ALL[family], **kw)


def same_row(family: str, row, base) -> bool:
    """One batch row left unsteered: bit for bit, but HiDream's mixture-of-experts FFN runs the tokens of all
    rows through each expert together, so a row's last bits follow what the other rows route (measured: 5e-7 on a
    row when the other is steered, as between a batch of one and of two); there, to 1e-5."""
    if family == "hidream":
        return torch.allclose(row, base, atol=1e-5, rtol=0)
    return torch.equal(row, base)


def tokens_of(name: str, family: str = "") -> int:
    if name.endswith("txt"):
        return 2 * TXT if family == "hidream" else TXT
    return IMG


STEER = SteeringConfig(blend=1.0, repel=1.0)


# ------------------------------------------------------------------------ shared properties (both adapters)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_identity_at_zero_strength_is_bit_exact(adapter, name, family):
    a = adapter(name, family)
    inp = inputs(family, 2)
    base, rec = a.run(inp, rec=ALL[family])
    out, rec0 = a.run(inp, firing(family), SteeringConfig(blend=0.0, repel=0.0), rec=ALL[family])
    assert torch.equal(out, base)
    assert rec0.keys() == rec.keys() and all(torch.equal(rec0[k], rec[k]) for k in rec)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_steering_changes_output_only_when_harmful_latents_fire(adapter, name, family):
    a = adapter(name, family)
    inp = inputs(family, 1)
    base, _ = a.run(inp)
    assert not torch.equal(a.run(inp, firing(family), STEER)[0], base)
    assert torch.equal(a.run(inp, firing(family, fire=False), STEER)[0], base)
    assert torch.equal(a.run(inp, firing(family), STEER.with_(threshold=1e6))[0], base)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_hooks_run_at_exactly_the_chosen_positions(adapter, name, family, monkeypatch):
    d = firing(family)
    owner = {id(e.sae): p.name for p, e in d.entries.items()}
    calls = []
    orig = PositionSteerer.steer

    def spy(self, x, cfg, rows=None):
        out = orig(self, x, cfg, rows)
        calls.append((owner[id(self.sae)], x.shape[1], out is not x))
        return out

    monkeypatch.setattr(PositionSteerer, "steer", spy)
    flux_style = ["double.0.img", "double.1.txt", "single.0.txt", "single.1.img"]
    chosen = {"flux": flux_style, "chroma": flux_style, "flux2": flux_style, "sd3": ["joint.0.txt", "joint.1.img"],
              "qwen_image": ["double.0.txt", "double.1.img"], "wan": ["double.1.img"], "hunyuan_image": flux_style,
              "lumina2": ["single.0.txt", "single.1.img"], "z_image": ["single.0.txt", "single.1.img"],
              "hidream": flux_style}[family]
    adapter(name, family).run(inputs(family, 2), d, STEER, positions=",".join(chosen))
    assert sorted(calls) == sorted((p, tokens_of(p, family), True) for p in chosen)  # once each, and each steered


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_recorded_streams_have_the_model_shapes(adapter, name, family):
    _, got = adapter(name, family).run(inputs(family, 2), rec=ALL[family])
    assert sorted(got) == sorted(ALL[family])
    for p, x in got.items():
        assert x.shape == (2, tokens_of(p, family), WIDTH[family]), p


CASES = [(f, p) for f in FAMILIES for p in ALL[f]]


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("name", ADAPTERS)
@given(case=st.sampled_from(CASES), q=st.floats(0.2, 0.8), blend=st.floats(0.0, 1.0), repel=st.floats(0.0, 3.0),
       seed=st.integers(0, 100))
def test_the_block_output_is_exactly_the_steered_stream(adapter, name, case, q, blend, repel, seed):
    """Steering one position alone: its stream becomes PositionSteerer.steer of the unsteered stream, bit for
    bit; tokens at or below the gate τ (a quantile of their harmful mass) keep their values exactly."""
    family, pos = case
    a = adapter(name, family)
    d = firing(family, [pos], seed=seed)
    inp = inputs(family, 1, seed=seed)
    _, before = a.run(inp, rec=[pos])
    x = before[pos]
    steerer = d.entries[parse(pos)].steerer()
    mass = steerer.harmful_mass(x)
    cfg = SteeringConfig(blend=blend, repel=max(repel, 0.1), threshold=float(mass.flatten().quantile(q)))
    _, after = a.run(inp, d, cfg, rec=[pos])
    assert torch.equal(after[pos], steerer.steer(x, cfg))
    kept = mass <= cfg.threshold
    assert kept.any() and (~kept).any()
    assert torch.equal(after[pos][kept], x[kept])
    assert not torch.equal(after[pos][~kept], x[~kept])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_window_follows_the_schedule(adapter, name, family):
    a = adapter(name, family)
    inp = inputs(family, 1, sigma=0.5)  # step 2 of 4: progress 0.5
    base, _ = a.run(inp)
    d = firing(family)
    assert not torch.equal(a.run(inp, d, STEER.with_(start=0.5, end=1.0), steps=4)[0], base)
    assert torch.equal(a.run(inp, d, STEER.with_(start=0.0, end=0.5), steps=4)[0], base)
    assert torch.equal(a.run(inp, d, STEER.with_(start=0.75, end=1.0), steps=4)[0], base)
    assert not torch.equal(a.run(inp, d, STEER.with_(start=0.75, end=1.0))[0], base)  # no schedule: steer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ADAPTERS)
def test_apply_to_steers_only_its_half(adapter, name, family):
    a = adapter(name, family)
    inp = inputs(family, 2)
    base, _ = a.run(inp)
    d = firing(family)
    layout = ("uncond", "cond")
    cond, _ = a.run(inp, d, STEER.with_(apply_to="cond"), halves=layout)
    uncond, _ = a.run(inp, d, STEER.with_(apply_to="uncond"), halves=layout)
    assert same_row(family, cond[0], base[0]) and not torch.equal(cond[1], base[1])
    assert same_row(family, uncond[1], base[1]) and not torch.equal(uncond[0], base[0])


def with_variant(d, name: str | None):
    d.variant = name
    return d


# (model, dictionary, the refusal); the models' variants: Flux, Chroma, Flux2, QwenImage, WAN21_T2V, HunyuanImage21,
# Lumina2, ZImage, HiDream
REFUSALS = [
    ("flux", make_dictionary("flux", 32, ["double.0.img"]), r"double\.0\.img has width 32 in the dictionary but 64"),
    ("flux", make_dictionary("flux", 64, ["double.5.img"]), r"double\.5\.img: the model has 2 double blocks"),
    ("flux", make_dictionary("sd3", 64, ["joint.0.img"]), r"made for SD3, but the model is FLUX \(Flux\)$"),
    ("sd3", make_dictionary("sd3", 128, ["joint.1.txt"]), r"joint\.1\.txt: the last joint block outputs no text"),
    ("flux", make_dictionary("flux", 64, ["single.1.txt"]), r"single\.1\.txt: FLUX discards the text tokens"),
    ("chroma", make_dictionary("flux", 64, ["double.0.img"]), r"made for FLUX, but the model is CHROMA \(Chroma\)$"),
    ("flux", make_dictionary("chroma", 64, ["double.0.img"]), r"made for CHROMA, but the model is FLUX \(Flux\)$"),
    ("flux2", make_dictionary("flux", 64, ["double.0.img"]), r"made for FLUX, but the model is FLUX2 \(Flux2\)$"),
    ("chroma", make_dictionary("flux2", 64, ["single.0.img"]), r"made for FLUX2, but the model is CHROMA \(Chroma\)$"),
    ("qwen_image", make_dictionary("flux", 64, ["double.0.img"]),
     r"made for FLUX, but the model is QWEN_IMAGE \(QwenImage\)$"),
    ("wan", make_dictionary("qwen_image", 64, ["double.0.img"]),
     r"made for QWEN_IMAGE, but the model is WAN \(WAN21_T2V\)$"),
    ("flux", with_variant(make_dictionary("flux", 64, ["double.0.img"]), "FluxSchnell"),
     r"made for FLUX \(FluxSchnell\), but the model is FLUX \(Flux\)$"),
    ("wan", with_variant(make_dictionary("wan", 64, ["double.0.img"]), "WAN22_T2V"),
     r"made for WAN \(WAN22_T2V\), but the model is WAN \(WAN21_T2V\)$"),
    ("wan", make_dictionary("wan", 64, ["double.0.txt"]), r"double\.0\.txt: WAN blocks return no txt stream"),
    ("qwen_image", make_dictionary("qwen_image", 64, ["double.1.txt"]), r"double\.1\.txt: QWEN_IMAGE discards"),
    ("chroma", make_dictionary("chroma", 64, ["single.1.txt"]), r"single\.1\.txt: CHROMA discards the text tokens"),
    ("hunyuan_image", make_dictionary("flux", 64, ["double.0.img"]),
     r"made for FLUX, but the model is HUNYUAN_IMAGE \(HunyuanImage21\)$"),
    ("flux", make_dictionary("hunyuan_image", 64, ["double.0.img"]), r"made for HUNYUAN_IMAGE, but the model is FLUX \(Flux\)$"),
    ("hidream", make_dictionary("hunyuan_image", 64, ["single.0.img"]),
     r"made for HUNYUAN_IMAGE, but the model is HIDREAM \(HiDream\)$"),
    ("lumina2", make_dictionary("hidream", 64, ["single.0.img"]), r"made for HIDREAM, but the model is LUMINA2 \(Lumina2\)$"),
    ("z_image", with_variant(make_dictionary("lumina2", 384, ["single.0.img"]), "Lumina2"),
     r"made for LUMINA2 \(Lumina2\), but the model is LUMINA2 \(ZImage\)$"),
    ("lumina2", with_variant(make_dictionary("lumina2", 64, ["single.0.img"]), "ZImage"),
     r"made for LUMINA2 \(ZImage\), but the model is LUMINA2 \(Lumina2\)$"),
    ("z_image", make_dictionary("lumina2", 384, ["double.0.img"]), r"double\.0\.img belongs to FLUX, but the model is LUMINA2"),
    ("z_image", make_dictionary("lumina2", 384, ["single.1.txt"]), r"single\.1\.txt: LUMINA2 discards the text tokens"),
    ("hidream", make_dictionary("hidream", 64, ["single.1.txt"]), r"single\.1\.txt: HIDREAM discards the text tokens"),
    ("hunyuan_image", make_dictionary("hunyuan_image", 32, ["single.0.txt"]),
     r"single\.0\.txt has width 32 in the dictionary but 64"),
]


@pytest.mark.parametrize("name", ADAPTERS)
def test_mismatched_dictionaries_are_rejected_with_the_same_message(adapter, name):
    for family, d, message in REFUSALS:
        with pytest.raises(DictionaryError, match=message):
            adapter(name, family).run(inputs(family, 1), d, STEER)
    with pytest.raises(PositionError, match=r"single\.0\.img .*not in the dictionary"):
        adapter(name, "flux").run(inputs("flux", 1), firing("flux", ["double.0.img"]), STEER, positions="single.0.img")
    adapter(name, "flux").run(inputs("flux", 1), make_dictionary("flux", 64, ["double.0.img"]), STEER)  # no variant: any


@pytest.mark.comfy
def test_refusals_read_alike_in_both_runtimes(adapter):
    def refusal(name, family, d):
        with pytest.raises(DictionaryError) as e:
            adapter(name, family).run(inputs(family, 1), d, STEER)
        return str(e.value)

    for family, d, _ in REFUSALS:
        assert refusal("diffusers", family, d) == refusal("comfy", family, d)


DETECTOR = {"flux": "double.0.txt", "chroma": "double.0.txt", "flux2": "double.0.txt", "sd3": "joint.0.txt",
            "qwen_image": "double.0.txt", "hunyuan_image": "double.0.txt", "lumina2": "single.0.txt",
            "z_image": "single.0.txt", "hidream": "double.0.txt"}


def two_images(family):
    """Two images whose prompts differ in strength, so that a text-stream statistic tells them apart."""
    inp = inputs(family, 2)
    inp["ctx"] = inp["ctx"] * torch.tensor([1.0, 0.25]).view(2, 1, 1)
    inp["llama"] = inp["llama"] * torch.tensor([1.0, 0.25]).view(2, 1, 1, 1)
    return inp


def image_gate_case(dmodels, family, inp):
    """A dictionary and per-image config whose detector (the first block's text stream, a ReLU SAE firing
    along its harmful directions) flags exactly one of the two images of `inp`: τ sits halfway between the
    two images' statistic, at least 3 % away from both (the adapters agree to 1e-4). Every other position fires on every token but has
    a per-image unit so large that it never flags an image by itself. Returns (dictionary, cfg, flagged row)."""
    d = firing(family)
    for e in d.entries.values():
        e.image_gate_scale = 1e9
    det = d.entries[parse(DETECTOR[family])]
    relu = SparseAutoencoder(det.sae.d, det.sae.latents, det.sae.k, "relu")
    relu.load_state_dict(det.sae.state_dict())
    with torch.no_grad():
        relu.b_enc[len(det.harmful):] = -1e4
        relu.b_enc[:len(det.harmful)] = 0.0
    det.sae, det.image_gate_scale = relu.requires_grad_(False), 1.0
    _, rec = DiffusersAdapter("diffusers", family, dmodels[family]).run(inp, rec=[DETECTOR[family]])
    stat = det.steerer().image_mass(rec[DETECTOR[family]])
    lo, hi = sorted(stat.tolist())
    tau = (lo + hi) / 2
    assert lo < tau / 1.03 and hi > tau * 1.03, f"the two images' statistics {stat.tolist()} are too close"
    return d, STEER.with_(gate="image", detect="text", threshold=tau), int(stat.argmax())


@pytest.mark.parametrize("family", TEXT)
@pytest.mark.parametrize("name", ADAPTERS)
def test_per_image_gate_follows_the_text_decision(adapter, name, family, dmodels):
    """The text position's decision reaches every position of the call: the flagged image is steered, the
    other keeps every bit, though every acting position fires on both."""
    a, inp = adapter(name, family), two_images(family)
    d, cfg, flagged = image_gate_case(dmodels, family, inp)
    base, _ = a.run(inp)
    out, _ = a.run(inp, d, cfg)
    assert same_row(family, out[1 - flagged], base[1 - flagged])
    assert not torch.equal(out[flagged], base[flagged])
    alone, _ = a.run(inp, d, cfg.with_(detect="each"), positions=",".join(p for p in ALL[family] if p != DETECTOR[family]))
    assert torch.equal(alone, base)  # deciding for themselves, the acting positions flag nothing


@pytest.mark.parametrize("family", TEXT)
def test_each_call_decides_afresh(dmodels, family):
    """One `steer` context, two calls: the second call's decision is its own (the images swapped places)."""
    inp = two_images(family)
    swapped = {k: v.flip(0) for k, v in inp.items()}
    d, cfg, flagged = image_gate_case(dmodels, family, inp)
    m = dmodels[family]
    bases = [dforward(m, family, inp), dforward(m, family, swapped)]
    with steer(m, d, cfg):
        outs = [dforward(m, family, inp), dforward(m, family, swapped)]
    for (out, base), row in zip(zip(outs, bases), (flagged, 1 - flagged)):
        assert same_row(family, out[1 - row], base[1 - row]) and not torch.equal(out[row], base[row])


# ------------------------------------------------------------------------------ the two adapters agree


def assert_agree(family, rec_d, rec_c, out_d, out_c, names):
    """The same streams at `names` and, except for Chroma at 2 + 2 blocks (see the module docstring), the same
    model output, to float rounding."""
    assert sorted(rec_d) == sorted(rec_c) == sorted(names)
    for p in names:
        torch.testing.assert_close(rec_d[p], rec_c[p], atol=1e-4, rtol=1e-4, msg=lambda m, p=p: f"{p}: {m}")
    if family != "chroma":
        torch.testing.assert_close(out_d, out_c, atol=1e-4, rtol=1e-4)


@pytest.mark.comfy
@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_and_comfyui_agree_unsteered_and_steered(adapter, family):
    """Equal weights and inputs: the same block outputs and model output, unsteered and with one dictionary."""
    dif, com = adapter("diffusers", family), adapter("comfy", family)
    inp = inputs(family, 2, sigma=0.5)
    d = firing(family)
    for kw in ({}, {"d": d, "cfg": STEER.with_(start=0.25), "steps": 4}):
        (out_d, rec_d), (out_c, rec_c) = dif.run(inp, rec=ALL[family], **kw), com.run(inp, rec=ALL[family], **kw)
        assert_agree(family, rec_d, rec_c, out_d, out_c, ALL[family])
    base, rec = dif.run(inp, rec=ALL[family])
    assert not torch.equal(out_d, base)  # the second round did steer
    assert not torch.equal(rec_d[ALL[family][-1]], rec[ALL[family][-1]])


@pytest.mark.comfy
@pytest.mark.parametrize("family", TEXT)
def test_diffusers_and_comfyui_agree_under_the_per_image_gate(adapter, family, dmodels):
    dif, com = adapter("diffusers", family), adapter("comfy", family)
    inp = two_images(family)
    d, cfg, flagged = image_gate_case(dmodels, family, inp)
    (out_d, rec_d), (out_c, rec_c) = dif.run(inp, d, cfg, rec=ALL[family]), com.run(inp, d, cfg, rec=ALL[family])
    assert_agree(family, rec_d, rec_c, out_d, out_c, ALL[family])
    base, _ = dif.run(inp)
    assert same_row(family, out_d[1 - flagged], base[1 - flagged]) and not torch.equal(out_d[flagged], base[flagged])


@pytest.mark.comfy
@pytest.mark.parametrize("family", FLUX_STYLE)
def test_diffusers_and_comfyui_agree_at_the_text_input(adapter, family):
    """`input.txt` is the conditioning as the DiT receives it (`encoder_hidden_states`, CTX wide) in both."""
    dif, com = adapter("diffusers", family), adapter("comfy", family)
    assert layout_of(dif.model).width_of(parse("input.txt")) == CTX == comfyui.layout_of(com.model).input_width
    inp = inputs(family, 2)
    d = make_dictionary(family, CTX, ["input.txt"])
    names = ["input.txt", "double.0.img", "single.0.txt"]
    base, rec = dif.run(inp, rec=names)
    assert torch.equal(rec["input.txt"], inp["ctx"])
    (out_d, rec_d), (out_c, rec_c) = dif.run(inp, d, STEER, rec=names), com.run(inp, d, STEER, rec=names)
    assert_agree(family, rec_d, rec_c, out_d, out_c, names)
    assert torch.equal(rec_d["input.txt"], d.entries[parse("input.txt")].steerer().steer(inp["ctx"], STEER))
    assert not torch.equal(out_d, base)
    zero, rec0 = dif.run(inp, d, SteeringConfig(blend=0.0, repel=0.0), rec=names)
    assert torch.equal(zero, base) and all(torch.equal(rec0[n], rec[n]) for n in names)


REFERENCE = ["flux", "flux2", "qwen_image"]  # FLUX.1 Kontext, Flux.2 and Qwen-Image edits


@pytest.mark.comfy
@pytest.mark.parametrize("family", REFERENCE)
def test_reference_image_tokens_are_never_steered(adapter, family):
    """A reference latent beside the output: its tokens are in neither stream, stay unsteered, and both runtimes
    see the same output-image tokens (ComfyUI's `ref_latents`, diffusers' tokens after the output's)."""
    dif, com = adapter("diffusers", family), adapter("comfy", family)
    inp = inputs(family, 2)
    refs = [torch.randn(2, *latent_shape(family), generator=torch.Generator().manual_seed(9))]
    names = [n for n in ALL[family] if n.startswith("double.0") or n.startswith("single.0")]
    seen = []  # the image tokens block 0 hands on (block 1's input, after the hooks on block 0)
    handle = dif.model.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)
    try:
        base, rec = dif.run(inp, rec=names, refs=refs)
        out_d, rec_d = dif.run(inp, firing(family), STEER, rec=names, refs=refs)
    finally:
        handle.remove()
    assert all(rec[n].shape[1] == tokens_of(n) for n in names)  # 16 output-image tokens, not 32
    plain, steered = seen
    assert plain.shape[1] == 2 * IMG and torch.equal(steered[:, IMG:], plain[:, IMG:])
    assert not torch.equal(steered[:, :IMG], plain[:, :IMG])
    out_c, rec_c = com.run(inp, firing(family), STEER, rec=names, refs=refs)
    assert_agree(family, rec_d, rec_c, out_d, out_c, names)
    assert not torch.equal(out_d, base)
    txt_only = [(a.run(inp, firing(family), STEER, "double.0.txt", rec=names, refs=refs)) for a in (dif, com)]
    assert_agree(family, txt_only[0][1], txt_only[1][1], txt_only[0][0], txt_only[1][0], names)
    assert torch.equal(txt_only[0][1]["double.0.img"], rec["double.0.img"])


@pytest.mark.comfy
def test_chroma_model_output_agrees_at_comfyuis_modulation_count(comfy):
    """2 double + 106 single blocks need 3·106 + 12·2 + 2 = 344 modulation vectors, ComfyUI's fixed count: the
    final layer's are then the same ones, and so is the model output, unsteered and steered."""
    dm = tiny_diffusers("chroma", single=106)
    dif, com = DiffusersAdapter("diffusers", "chroma", dm), ComfyAdapter("comfy", "chroma", same_weights("chroma", dm))
    inp = inputs("chroma", 1)
    for kw in ({}, {"d": firing("chroma", ["double.1.img", "single.105.img"]), "cfg": STEER}):
        torch.testing.assert_close(dif.run(inp, **kw)[0], com.run(inp, **kw)[0], atol=1e-4, rtol=1e-4)


# -------------------------------------------------------------------------------- diffusers adapter only


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_are_removed_on_exit_and_on_errors(dmodels, family, tmp_path):
    m = dmodels[family]
    inp = inputs(family, 1)
    base = dforward(m, family, inp)
    path = tmp_path / "d.safetensors"
    save(firing(family), str(path))
    with steer(m, path, STEER) as hooks:  # a file path works as well as a dictionary
        assert hooks.handles and not no_hooks(m)
        assert not torch.equal(dforward(m, family, inp), base)
    assert no_hooks(m) and not hooks.handles
    assert torch.equal(dforward(m, family, inp), base)

    def boom(p, x, info):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"), steer(m, path, STEER), record(m, "all", boom):
        dforward(m, family, inp)
    assert no_hooks(m)
    # raised by a hook, inside the forward: a batch of 1 for a 2-chunk layout
    cond_only = steer(m, path, STEER.with_(apply_to="cond"), halves=("uncond", "cond"))
    with pytest.raises(ValueError, match="cannot be split into 2"), cond_only:
        dforward(m, family, inp)
    assert no_hooks(m)
    assert torch.equal(dforward(m, family, inp), base)


def test_positions_are_checked_against_the_transformer(dmodels):
    for family, names, message in [
        ("flux", "double.2.img", (r"double\.2\.img: the model has 2 double blocks .*this transformer has 2 double, "
                                  r"2 single blocks of width 64")),
        ("flux", ["single.1.txt"], r"single\.1\.txt: FLUX discards"),
        ("flux", "joint.0.img", r"joint\.0\.img belongs to SD3, but the model is FLUX \(Flux\)"),
        ("sd3", "joint.0.img, joint.1.txt", r"joint\.1\.txt: the last joint block outputs no text .*2 joint blocks"),
        ("sd3", "double.0.img", r"belongs to FLUX, but the model is SD3"),
        ("sd3", "joint.0.image", r"bad position name 'joint\.0\.image'"),
        ("sd3", "input.txt", r"input\.txt: SafeDIG does not hook the text input of SD3"),
        ("qwen_image", "input.txt", r"input\.txt: SafeDIG does not hook the text input of QWEN_IMAGE \(QwenImage\)"),
        ("wan", "double.0.txt", r"double\.0\.txt: WAN blocks return no txt stream .*2 double blocks of width 64"),
        ("qwen_image", "single.0.img", r"single\.0\.img belongs to FLUX, but the model is QWEN_IMAGE"),
        ("chroma", "single.2.img", r"single\.2\.img: the model has 2 single blocks"),
        ("flux2", "double.1.txt, single.1.txt", r"single\.1\.txt: FLUX2 discards"),
        ("hunyuan_image", "input.txt", r"does not hook the text input of HUNYUAN_IMAGE \(HunyuanImage21\)"),
        ("z_image", "double.0.img", r"belongs to FLUX, but the model is LUMINA2 \(ZImage\).* 2 single blocks of width 384"),
        ("lumina2", "single.1.txt", r"single\.1\.txt: LUMINA2 discards"),
        ("hidream", "single.2.img", r"single\.2\.img: the model has 2 single blocks"),
    ]:
        model = dmodels[family]
        with pytest.raises(PositionError, match=message):
            record(model, names, print)
        assert no_hooks(model)
    with pytest.raises(ValueError, match=r"FluxTransformer2DModel, .*, HiDreamImageTransformer2DModel; got a Linear"):
        layout_of(torch.nn.Linear(2, 2))
    layouts = {f: layout_of(m) for f, m in dmodels.items()}
    assert layouts["sd3"].last_txt_absent and layouts["flux"].blocks == {"double": 2, "single": 2}
    assert {f: (lay.family, lay.variant) for f, lay in layouts.items()} == {
        "flux": ("flux", "Flux"), "sd3": ("sd3", None), "chroma": ("chroma", "Chroma"), "flux2": ("flux2", "Flux2"),
        "qwen_image": ("qwen_image", "QwenImage"), "wan": ("wan", "WAN21_T2V"),
        "hunyuan_image": ("hunyuan_image", "HunyuanImage21"), "lumina2": ("lumina2", "Lumina2"),
        "z_image": ("lumina2", "ZImage"), "hidream": ("hidream", "HiDream")}
    for name in ("hunyuan_image", "hidream"):
        assert [p.name for p in layouts[name].positions()] == FLUX_ALL  # no text input position
    assert [p.name for p in layouts["z_image"].positions()] == NEXTDIT and layouts["z_image"].width == 384
    assert [p.name for p in layouts["chroma"].positions()] == ["input.txt", *FLUX_ALL]
    assert [p.name for p in layouts["qwen_image"].positions()] == ALL["qwen_image"]
    assert [p.name for p in layouts["wan"].positions()] == ALL["wan"]


def test_apply_to_needs_a_batch_layout(dmodels):
    with pytest.raises(ValueError, match=r"apply_to='cond' needs the batch layout: pass halves"):
        steer(dmodels["sd3"], firing("sd3"), STEER.with_(apply_to="cond"))
    with pytest.raises(ValueError, match=r"halves=\['positive'\]"):
        steer(dmodels["sd3"], firing("sd3"), STEER, halves="positive")
    assert no_hooks(dmodels["sd3"])


@pytest.mark.parametrize("family", FAMILIES)
def test_progress_from_the_scheduler_and_by_hand(dmodels, family):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = dmodels[family]
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)  # 1000, 667, 334, 1
    seen = []
    d = firing(family)
    for step, t in enumerate(sched.timesteps):
        inp = inputs(family, 1, sigma=float(t) / 1000)
        with record(m, ALL[family][:1], lambda p, x, info: seen.append(info), schedule=sched):
            base = dforward(m, family, inp)
        with steer(m, d, STEER.with_(start=0.5), schedule=sched) as hooks:
            assert torch.equal(dforward(m, family, inp), base) == (step < 2)
            hooks.set_progress(0.9)
            assert not torch.equal(dforward(m, family, inp), base)
            hooks.set_progress(0.0)
            assert torch.equal(dforward(m, family, inp), base)
    assert [i["progress"] for i in seen] == [0.0, 0.25, 0.5, 0.75]
    assert [round(i["timestep"]) for i in seen] == [1000, 667, 334, 1]
    with (pytest.raises(ValueError, match=r"timestep 500 .* is not in the steering schedule \[1 .. 1000\]"),
          steer(m, d, STEER, schedule=sched)):
        dforward(m, family, inputs(family, 1, sigma=0.5))


class JoinedSingle(torch.nn.Module):
    """diffusers' older FluxSingleTransformerBlock contract: one sequence [txt | img] in, one out."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states, temb, image_rotary_emb=None):
        return self.block(hidden_states=hidden_states, encoder_hidden_states=hidden_states[:, :0], temb=temb,
                          image_rotary_emb=image_rotary_emb)[1]


class JoinedFlux(diffusers.FluxTransformer2DModel):
    """A FLUX transformer with the older single-block loop (join, run the single blocks, drop the text): a
    FluxTransformer2DModel by class, with the weights of a current one."""

    @classmethod
    def like(cls, flux):
        m = cls.from_config(flux.config)
        m.load_state_dict(flux.state_dict())
        m.single_transformer_blocks = torch.nn.ModuleList(JoinedSingle(b) for b in m.single_transformer_blocks)
        return m.eval().requires_grad_(False)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance,
                return_dict=False):
        f = self
        img, txt = f.x_embedder(hidden_states), f.context_embedder(encoder_hidden_states)
        temb = f.time_text_embed(timestep * 1000, guidance * 1000, pooled_projections)
        rope = f.pos_embed(torch.cat([txt_ids, img_ids]))
        for block in self.transformer_blocks:
            txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)
        seq = torch.cat([txt, img], dim=1)
        for block in self.single_transformer_blocks:
            seq = block(seq, temb, rope)
        return (f.proj_out(f.norm_out(seq[:, txt.shape[1]:], temb)),)


def block_outputs(model, family, inp, block, positions=(), d=None):
    """The whole output of `block` (every token, as the model hands it on) in one call, steered at `positions`."""
    got = []
    with contextlib.ExitStack() as stack:
        if positions:
            stack.enter_context(steer(model, d or firing(family), STEER, positions=",".join(positions)))
        handle = block.register_forward_hook(lambda m, a, out: got.append(out if torch.is_tensor(out) else tuple(out)))
        stack.callback(handle.remove)
        dforward(model, family, inp)
    return got[0]


def test_padding_and_appended_tokens_are_never_steered(dmodels):
    """Z-Image's image and caption pads, HiDream's per-block Llama tokens (text output of a double block, tail of
    a single block's sequence) and a non-square image's pad tokens keep their values; the streams around them are
    steered."""
    z = dmodels["z_image"]
    inp = inputs("z_image", 2)
    plain = block_outputs(z, "z_image", inp, z.layers[0])
    steered = block_outputs(z, "z_image", inp, z.layers[0], ["single.0.img", "single.0.txt"])
    assert plain.shape[1] == 32 + 32  # 16 image tokens padded to 32, 5 caption tokens padded to 32
    for pad in (slice(IMG, 32), slice(32 + TXT, 64)):
        assert torch.equal(steered[:, pad], plain[:, pad])
    for part in (slice(0, IMG), slice(32, 32 + TXT)):
        assert not torch.equal(steered[:, part], plain[:, part])

    h = dmodels["hidream"]
    inp = inputs("hidream", 2)
    (img0, txt0), (img1, txt1) = (block_outputs(h, "hidream", inp, h.double_stream_blocks[0], ps)
                                  for ps in ((), ["double.0.txt"]))
    assert txt0.shape[1] == 3 * TXT and torch.equal(img1, img0) and torch.equal(txt1[:, 2 * TXT:], txt0[:, 2 * TXT:])
    assert not torch.equal(txt1[:, :2 * TXT], txt0[:, :2 * TXT])
    seq0, seq1 = (block_outputs(h, "hidream", inp, h.single_stream_blocks[0], ps) for ps in ((), ["single.0.txt"]))
    assert seq0.shape[1] == IMG + 3 * TXT and torch.equal(seq1[:, IMG + 2 * TXT:], seq0[:, IMG + 2 * TXT:])
    assert torch.equal(seq1[:, :IMG], seq0[:, :IMG]) and not torch.equal(seq1[:, IMG:IMG + 2 * TXT], seq0[:, IMG:IMG + 2 * TXT])

    wide = dict(inp, x=torch.randn(2, 16, SIDE, 2 * SIDE, generator=torch.Generator().manual_seed(3)))
    got = {}
    with record(h, ["double.0.img", "single.0.img"], lambda p, x, info: got.__setitem__(p.name, x.clone())):
        dforward(h, "hidream", wide)
    assert all(x.shape[1] == 2 * IMG for x in got.values())  # 4 × 8 tokens, not the 256 of max_seq
    (img0, _), (img1, _) = (block_outputs(h, "hidream", wide, h.double_stream_blocks[0], ps) for ps in ((), ["double.0.img"]))
    assert img0.shape[1] == h.max_seq and torch.equal(img1[:, 2 * IMG:], img0[:, 2 * IMG:])
    assert not torch.equal(img1[:, :2 * IMG], img0[:, :2 * IMG])


def test_captions_of_other_lengths_in_one_call(dmodels):
    """Z-Image's pipeline stacks the negative prompt's caption, which may be shorter: image positions steer, text
    positions refuse the call. Lumina 2 puts each image after its own caption: the call is refused."""
    z = dmodels["z_image"]
    inp = inputs("z_image", 2)
    base = z(list(inp["x"][:, :, None].unbind(0)), 1 - inp["sigma"], [inp["ctx"][0], inp["ctx"][1, :3]],
             return_dict=False)[0]
    with torch.no_grad(), steer(z, firing("z_image"), STEER, positions="single.1.img"):
        out = z(list(inp["x"][:, :, None].unbind(0)), 1 - inp["sigma"], [inp["ctx"][0], inp["ctx"][1, :3]],
                return_dict=False)[0]
    assert not torch.equal(torch.stack(out), torch.stack(base))
    with (pytest.raises(ValueError, match=r"got captions of \[3, 5\] tokens in one call .*use image positions"),
          steer(z, firing("z_image"), STEER, positions="single.0.txt"), torch.no_grad()):
        z(list(inp["x"][:, :, None].unbind(0)), 1 - inp["sigma"], [inp["ctx"][0], inp["ctx"][1, :3]])
    lumina = dmodels["lumina2"]
    inp = inputs("lumina2", 2)
    mask = torch.tensor([[1] * TXT, [1] * 3 + [0] * (TXT - 3)])
    with (pytest.raises(ValueError, match=r"got captions of \[3, 5\] valid tokens in one call"),
          record(lumina, ["single.0.img"], print), torch.no_grad()):
        lumina(hidden_states=inp["x"], timestep=1 - inp["sigma"], encoder_hidden_states=inp["ctx"],
               encoder_attention_mask=mask)
    assert no_hooks(z) and no_hooks(lumina)


def test_joined_single_blocks_of_older_diffusers(dmodels):
    flux = dmodels["flux"]
    joined = JoinedFlux.like(flux)
    inp = inputs("flux", 2)
    names = ["single.0.txt", "single.0.img", "single.1.img", "double.1.txt"]
    d = firing("flux", names)
    runs = {}
    for model in (flux, joined):
        got = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(steer(model, d, STEER, positions="single.0.txt, single.1.img"))
            stack.enter_context(record(model, names, lambda p, x, info, got=got: got.__setitem__(p.name, x.clone())))
            runs[model is joined] = dforward(model, "flux", inp), got
        assert no_hooks(model)
    (out_new, rec_new), (out_old, rec_old) = runs[False], runs[True]
    for p in names:
        torch.testing.assert_close(rec_old[p], rec_new[p], atol=1e-5, rtol=1e-5)
        assert rec_old[p].shape == (2, TXT if p.endswith("txt") else IMG, 64)
    torch.testing.assert_close(out_old, out_new, atol=1e-5, rtol=1e-5)
    assert not torch.equal(out_new, dforward(flux, "flux", inp))


def test_low_precision_model(dmodels):
    m = copy.deepcopy(dmodels["sd3"]).to(torch.bfloat16)
    inp = {k: v.to(torch.bfloat16) for k, v in inputs("sd3", 1).items()}
    base = dforward(m, "sd3", inp)
    d = firing("sd3")
    got = {}
    with steer(m, d, STEER), record(m, ["joint.0.img"], lambda p, x, info: got.__setitem__(p.name, x)):
        out = dforward(m, "sd3", inp)
    assert out.dtype == got["joint.0.img"].dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert not torch.equal(out, base)
    assert d.entries[parse("joint.0.img")].sae.W_enc.dtype == torch.float32  # the master copy is untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_steers_like_the_cpu_one(dmodels):
    d = firing("flux")
    inp = inputs("flux", 1)
    with steer(dmodels["flux"], d, STEER):
        ref = dforward(dmodels["flux"], "flux", inp)
    m = copy.deepcopy(dmodels["flux"]).cuda()
    with steer(m, d, STEER):
        out = dforward(m, "flux", {k: v.cuda() for k, v in inp.items()})
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)
    assert d.entries[parse("double.0.img")].sae.W_enc.device.type == "cpu"  # the master weights stay put
