"""TEST-ONLY ComfyUI node pack: what a real ComfyUI server lacks to run SafeDIG without model files.

`tests/server_fixture.py` links this folder into the test server's `custom_nodes/`. Never install it
beside real models: its MODEL is a random-weight tiny FLUX/SD3 and its CONDITIONING is noise.

- SafeDIGTestTinyModel: a tiny random FLUX.1 (dev layout, width 64, 2 double + 2 single blocks) or SD3
  MMDiT (width 128, 2 joint blocks), from `safedig_core.adapters.comfy.runtime.tiny_flux` / `tiny_sd3`;
- SafeDIGTestConditioning: random text states of width 64 and a pooled vector of width 768 (FLUX, with
  guidance 3.5) or 2048 (SD3), i.e. what CLIPTextEncode would give those tiny models;
- SafeDIGTestClip: a CLIP stand-in with ComfyUI's encoding calls whose text states are derived from the
  prompt's text (`safedig_core.adapters.comfy.runner.tiny_encoder`), for SafeDIG Collect Activations.
Latents come from ComfyUI's own EmptySD3LatentImage (16 channels of zeros).
"""
from __future__ import annotations

import os
import sys

import torch

# The repo root, to import safedig_core as a top-level package. Appended, never prepended: the repo root
# holds SafeDIG's `nodes/` package, which must not shadow ComfyUI's `nodes` module.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
if _REPO not in sys.path:
    sys.path.append(_REPO)

from safedig_core.adapters.comfy import runtime as comfyui  # noqa: E402

FAMILIES = ["flux", "sd3"]
POOLED = {"flux": 768, "sd3": 2048}
CONTEXT = 64
CATEGORY = "SafeDIG/testing"


class SafeDIGTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES, {"default": "flux"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "TEST ONLY: a random-weight tiny FLUX or SD3 diffusion model."

    def build(self, family, seed):
        make = comfyui.tiny_flux if family == "flux" else comfyui.tiny_sd3
        return (make(seed=seed),)


class SafeDIGTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES, {"default": "flux"}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 512})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = "TEST ONLY: random text states for the tiny models."

    def encode(self, family, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, CONTEXT, generator=g)
        pooled = torch.randn(1, POOLED[family], generator=g)
        extra = {"guidance": 3.5} if family == "flux" else {}
        return (comfyui.conditioning(context, pooled, **extra),)


class TinyClip:
    def __init__(self, family):
        from safedig_core.adapters.comfy.runner import tiny_encoder

        self.encode = tiny_encoder(family)

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens, add_dict=None):
        return [[c, {**d, **(add_dict or {})}] for c, d in self.encode(tokens)[0]]


class SafeDIGTestClip:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILIES, {"default": "flux"})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "TEST ONLY: a CLIP stand-in for the tiny models."

    def load(self, family):
        return (TinyClip(family),)


NODE_CLASS_MAPPINGS = {
    "SafeDIGTestTinyModel": SafeDIGTestTinyModel,
    "SafeDIGTestConditioning": SafeDIGTestConditioning,
    "SafeDIGTestClip": SafeDIGTestClip,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SafeDIGTestTinyModel": "SafeDIG Test Tiny Model (TEST ONLY)",
    "SafeDIGTestConditioning": "SafeDIG Test Conditioning (TEST ONLY)",
    "SafeDIGTestClip": "SafeDIG Test CLIP (TEST ONLY)",
}
