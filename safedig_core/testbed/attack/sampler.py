"""The testbed's sampling loop with gradients: the soft attack differentiates through it.

ComfyUI's samplers run under `torch.no_grad`, so this loop calls the raw DiT (`model.model.diffusion_model`)
itself, with the training-time sampler's maths (`model.sample_x0`: Euler over the "simple" schedule, CFG on
x0, which is what KSampler computes for the testbed), and hands every call the *same* block patches the
defended model carries (`model_options["transformer_options"]["patches_replace"]`: SafeDIG's BlockSteering
with its per-image gate, or the dense baseline's) and the same wrappers of the DiT's forward (the steering of
its inputs, the pooled text vector among them; `steering_wrappers`). So the steering is the real one, not a surrogate: the
steered activations are differentiable (TopK encode, Blend, Repel), while the gate's open/closed decision and
the TopK selection are piecewise constant, as they are for any attacker. Residual adds run out of place
(`train_dit.out_of_place_adds`: same numbers) and attention through torch's SDPA, so autograd can go back. `tests/test_attack.py` checks the
loop reproduces KSampler's images.
"""
from __future__ import annotations

import torch

from ...adapters.comfy.patches import TOKEN_LAYOUT
from ..model import WRAPPER_KEY as X0_WRAPPER
from ..model import noise_for, schedule, to_image
from ..train_dit import out_of_place_adds, pytorch_attention_options


def steering_wrappers(model) -> dict:
    """The defended model's DIFFUSION_MODEL wrappers but the testbed's x0 → velocity one (this loop wants x0):
    the steering of the DiT's inputs (`input.txt`, `input.pooled`) runs there, not in a block patch."""
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    found = dict(model.wrappers.get(kind, {}))  # KSampler merges them into transformer_options (sampler_helpers)
    found.update(model.model_options.get("transformer_options", {}).get("wrappers", {}).get(kind, {}))
    kept = {key: fns for key, fns in found.items() if key != X0_WRAPPER}
    return {kind: kept} if kept else {}


def model_call(model, x, sigma, ctx, pooled, sample_sigmas, wrappers: dict):
    """x0 of one model call on the batch [cond; uncond] (ComfyUI's cond_or_uncond [0, 1]); `wrappers`: the
    model's `steering_wrappers`."""
    net = model.model.diffusion_model
    patches = model.model_options.get("transformer_options", {}).get("patches_replace")
    to = {"sigmas": sigma, "sample_sigmas": sample_sigmas, "cond_or_uncond": [0, 1], **pytorch_attention_options()}
    if wrappers:
        to["wrappers"] = wrappers  # the DiT's forward runs them, as under KSampler
    if patches:
        p = net.patch_size
        to["patches_replace"] = patches
        to[TOKEN_LAYOUT] = (ctx.shape[1], ((x.shape[-2] + p // 2) // p) * ((x.shape[-1] + p // 2) // p))
    with out_of_place_adds():  # ComfyUI's blocks add residuals in place, which autograd cannot go back through
        return net(x, sigma, ctx, y=pooled, transformer_options=to).float()


def images(model, ctx, pooled, neg_ctx, neg_pooled, seeds, steps: int, cfg: float) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] for conditioning (ctx [B, T, d], pooled [B, d]) and the empty prompt's
    (neg_*, batch 1), with gradients to the conditioning."""
    b = ctx.shape[0]
    sig = schedule(steps)
    x = noise_for(seeds).float() * sig[0]
    ctx2 = torch.cat([ctx, neg_ctx.expand(b, -1, -1)])
    pool2 = torch.cat([pooled, neg_pooled.expand(b, -1)])
    wrappers = steering_wrappers(model)
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        x0 = model_call(model, torch.cat([x, x]), torch.full((2 * b,), float(s)), ctx2, pool2, sig, wrappers)
        den = x0[b:] + (x0[:b] - x0[b:]) * cfg
        x = x + (x - den) / s * (s_next - s)
    return to_image(x)
