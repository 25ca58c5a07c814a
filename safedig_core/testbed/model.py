"""The testbed DiT inside ComfyUI: ComfyUI's own FLUX class (`comfy.ldm.flux.model.Flux`) at a tiny size.

- `TestbedFlux` is a `comfy.supported_models.Flux` model config with its own latent format: the "latent" is
  the 32x32 RGB image itself in [-1, 1] (3 channels, scale 1, no shift), patch size 4 (64 image tokens),
  no guidance embedding, time shift 0 (sigma = t, the schedule the DiT was trained for), float32.
- The network is trained to predict the clean image x0 (far better than velocity at this size, see issue 4).
  ComfyUI's FLUX model_base reads the network output as velocity (CONST: denoised = x_t - sigma * v, and
  the network's timestep input is sigma), so `load_testbed` attaches a DIFFUSION_MODEL wrapper
  (`x0_to_velocity`) that returns v = (x_t - x0_hat) / sigma: ComfyUI's denoised is then exactly x0_hat.
- `load_testbed()` -> (ModelPatcher, encode_fn); `generate(...)` samples through KSampler's code path.
- `sample_x0` is the training-time sampler (plain Euler on the raw network, the same sigmas and CFG as
  ComfyUI's euler/simple); tests check KSampler reproduces it.
"""
from __future__ import annotations

import json
import math
import os
from typing import ClassVar

import torch

from ..formats.atomic import replacing
from . import ASSETS
from .text import MAX_TOKENS, WIDTH

DIT_PATH = os.path.join(ASSETS, "dit.safetensors")
SIGMA_MIN = 1e-5  # the x0 -> v conversion divides by sigma; ComfyUI's samplers never call at sigma 0
WRAPPER_KEY = "safedig_testbed_x0"

ARCH = {"hidden_size": 96, "num_heads": 4, "depth": 2, "depth_single_blocks": 3, "mlp_ratio": 4.0,
        "patch_size": 4, "image_size": 32, "context_in_dim": WIDTH, "vec_in_dim": WIDTH,
        "context_tokens": MAX_TOKENS}


def flux_config(arch: dict = ARCH) -> dict:
    pe = arch["hidden_size"] // arch["num_heads"]
    third = (pe * 7 // 16) // 2 * 2  # FLUX splits its 128 RoPE dims 16/56/56; keep the proportion
    return {"image_model": "flux", "in_channels": 3, "out_channels": 3, "vec_in_dim": arch["vec_in_dim"],
            "context_in_dim": arch["context_in_dim"], "hidden_size": arch["hidden_size"],
            "mlp_ratio": arch["mlp_ratio"], "num_heads": arch["num_heads"], "depth": arch["depth"],
            "depth_single_blocks": arch["depth_single_blocks"], "axes_dim": [pe - 2 * third, third, third],
            "theta": 10000, "patch_size": arch["patch_size"], "qkv_bias": True, "guidance_embed": False}


def _classes():
    """The ComfyUI classes (defined lazily: `comfy` is importable only after `comfyui.bootstrap()`)."""
    global _CLASSES
    if _CLASSES is None:
        from ..adapters.comfy import runtime as comfyui

        comfyui.bootstrap()
        import comfy.latent_formats
        import comfy.supported_models

        class TestbedLatent(comfy.latent_formats.LatentFormat):
            """The testbed's latent is the RGB image in [-1, 1]: 3 channels, scale 1, no shift."""
            latent_channels = 3
            scale_factor = 1.0
            shift_factor = 0.0

            def process_in(self, latent):
                return latent

            def process_out(self, latent):
                return latent

        class TestbedFlux(comfy.supported_models.Flux):
            unet_config: ClassVar[dict] = {"image_model": "flux", "guidance_embed": False, "in_channels": 3}
            sampling_settings: ClassVar[dict] = {"shift": 0.0}  # flux_time_shift(0, 1, t) = t: sigma = t, as trained
            latent_format = TestbedLatent
            memory_usage_factor = 0.05
            supported_inference_dtypes: ClassVar[list] = [torch.float32]

        _CLASSES = (TestbedLatent, TestbedFlux)
    return _CLASSES


_CLASSES = None


def init_weights(net: torch.nn.Module, seed: int) -> None:
    """ComfyUI's ops skip init. Linear: normal(0, 0.02) (text/vector inputs scaled by fan-in), biases 0,
    norm scales 1; adaLN modulations and the final projection start at zero (DiT's adaLN-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(net.named_parameters()):
            if p.ndim == 1:
                p.fill_(1.0 if name.endswith(("scale", "weight")) else 0.0)
            elif ".lin." in f".{name}" or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
                p.zero_()
            else:
                std = min(0.02, 1.0 / math.sqrt(p.shape[1]))
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(arch: dict = ARCH, seed: int = 0, init: bool = True):
    """A ComfyUI FLUX model_base (`comfy.model_base.Flux`) for the testbed, float32 on the CPU."""
    from ..adapters.comfy.runtime import params_compat

    _, TestbedFlux = _classes()
    conf = TestbedFlux(params_compat(flux_config(arch)))
    conf.set_inference_dtype(torch.float32, None)
    model = conf.get_model({})
    if init:
        init_weights(model.diffusion_model, seed)
    model.testbed_arch = dict(arch)
    return model


def x0_to_velocity(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the network predicts x0; ComfyUI's FLUX expects velocity.
    FLUX's forward is (x, timestep, context, y, guidance, ref_latents, control, transformer_options); for
    FLUX the timestep is sigma. Returns v = (x - x0_hat) / sigma, so ComfyUI's denoised = x - sigma v = x0_hat."""
    x = args[0] if args else kwargs["x"]
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    x0 = executor(*args, **kwargs)
    sigma = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1))).clamp(min=SIGMA_MIN)
    return (x[:, :x0.shape[1]].to(x0.dtype) - x0) / sigma


def patcher(model):
    """Wrap a testbed model_base in a ModelPatcher with the x0 -> velocity wrapper attached."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension

    mp = comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                          offload_device=comfy.model_management.unet_offload_device())
    mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, x0_to_velocity)
    return mp


def save_dit(net: torch.nn.Module, path: str, arch: dict, extra: dict | None = None, dtype=torch.float16) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    meta = {"arch": json.dumps(arch), "format": "safedig-testbed-dit", "predicts": "x0"}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    with replacing(path) as tmp:
        save_file(sd, tmp, metadata=meta)


def load_model_base(path: str = DIT_PATH):
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no testbed DiT at {path}: train one with `python -m safedig_core.testbed.train_dit`")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    arch = json.loads(meta["arch"]) if "arch" in meta else ARCH
    model = build_model(arch, init=False)
    sd = {k: v.float() for k, v in load_file(path).items()}
    model.diffusion_model.load_state_dict(sd, strict=True)
    model.diffusion_model.eval()
    model.testbed_meta = meta
    return model


def make_encode_fn(encoder=None):
    """`encode_fn(prompts) -> (positive, negative)`: ComfyUI CONDITIONING for a batch of prompts, and the
    empty prompt's encoding as the negative (the unconditional of classifier-free guidance)."""
    from .text import shared_encoder

    enc = encoder or shared_encoder()

    def encode_fn(prompts):
        ctx, pooled = enc.encode(list(prompts))
        nctx, npooled = enc.encode([""])
        return ([[ctx, {"pooled_output": pooled}]], [[nctx, {"pooled_output": npooled}]])

    encode_fn.encoder = enc
    return encode_fn


def load_testbed(path: str = DIT_PATH, encoder=None):
    """(ModelPatcher, encode_fn): the committed testbed DiT in ComfyUI, ready for KSampler."""
    model = load_model_base(path)
    return patcher(model), make_encode_fn(encoder)


def noise_for(seeds, shape=(3, 32, 32)) -> torch.Tensor:
    """The initial noise KSampler draws for seed s on a one-image latent (comfy.sample.prepare_noise)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.manual_seed(int(s)), device="cpu") for s in seeds])


def to_image(x: torch.Tensor) -> torch.Tensor:
    """Latent (RGB in [-1, 1]) -> image in [0, 1]."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def generate(model, encode_fn, prompts, seeds, steps: int = 20, cfg: float = 3.0, sampler: str = "euler",
             scheduler: str = "simple", batch: int = 64, per_call: bool = False) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for `prompts` with per-prompt `seeds`, through KSampler.

    Image i is what one KSampler run on a one-image latent with seed `seeds[i]` gives. `per_call=True` does
    exactly that (`safedig_core.adapters.comfy.runtime.sample` once per prompt); the default batches prompts through the
    same `comfy.sample.sample` call KSampler makes, with each image's noise drawn from its own seed."""
    import comfy.sample

    from ..adapters.comfy import runtime as comfyui

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    arch = getattr(model.model, "testbed_arch", ARCH)
    hw = arch["image_size"]
    outs = []
    if per_call:
        for p, s in zip(prompts, seeds):
            pos, neg = encode_fn([p])
            outs.append(comfyui.sample(model, pos, neg, torch.zeros(1, 3, hw, hw), seed=s, steps=steps, cfg=cfg,
                                       sampler=sampler, scheduler=scheduler))
    else:
        for i in range(0, len(prompts), batch):
            ps, ss = prompts[i:i + batch], seeds[i:i + batch]
            pos, neg = encode_fn(ps)
            latent = torch.zeros(len(ps), 3, hw, hw)
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
            outs.append(comfy.sample.sample(model, noise_for(ss, latent.shape[1:]), steps, cfg, sampler, scheduler,
                                            pos, neg, latent, denoise=1.0, disable_pbar=True, seed=ss[0]))
    return to_image(torch.cat(outs)) if outs else torch.zeros(0, 3, hw, hw)


def schedule(steps: int) -> torch.Tensor:
    """The sigmas of ComfyUI's "simple" scheduler for the testbed's model sampling (shift 0: sigma = t over
    10000 discrete steps), ending at 0."""
    table = torch.arange(1, 10001, dtype=torch.float32) / 10000
    ss = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * ss))]) for i in range(steps)] + [0.0])


@torch.no_grad()
def sample_x0(net, context, pooled, neg_context, neg_pooled, noise, steps: int = 20, cfg: float = 3.0):
    """Training-time sampler on the raw network (`model.diffusion_model`): Euler over `schedule(steps)` with
    classifier-free guidance on x0 (ComfyUI's CFG mixes denoised outputs, which here are x0). Returns latents."""
    sig = schedule(steps)
    x = noise.clone().float() * sig[0]
    b = x.shape[0]
    nctx = neg_context.expand(b, -1, -1) if neg_context.shape[0] == 1 else neg_context
    npool = neg_pooled.expand(b, -1) if neg_pooled.shape[0] == 1 else neg_pooled
    ctx2, pool2 = torch.cat([context, nctx]), torch.cat([pooled, npool])
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        t = torch.full((2 * b,), float(s))
        x0 = net(torch.cat([x, x]), t, ctx2, y=pool2, transformer_options={}).float()
        x0c, x0u = x0[:b], x0[b:]
        den = x0u + (x0c - x0u) * cfg
        d = (x - den) / s
        x = x + d * (s_next - s)
    return x
