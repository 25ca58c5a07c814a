"""SafeDIG Testbed Model: the package's own small DiT, its text encoder and its "VAE", so a newcomer can watch
steering work in the UI on a CPU with nothing downloaded.

It outputs what a checkpoint loader does (MODEL, CLIP, VAE), so the stock CLIP Text Encode, Empty Latent
Image, KSampler and VAE Decode nodes drive it:
- MODEL: the committed testbed DiT (`safedig_core.testbed.model.load_testbed`: ComfyUI's FLUX class at a tiny
  size), 32×32 RGB "latents";
- CLIP: the testbed's MiniLM encoder (the pip-installed all-MiniLM-L6-v2 wheel) behind the two calls CLIP Text
  Encode and SafeDIG Collect Activations make (`tokenize`, `encode_from_tokens_scheduled`);
- VAE: the latent *is* the image in [-1, 1]; decoding maps it to [0, 1] and enlarges it 8× (nearest), so an
  Empty Latent Image of 256×256 is the testbed's 32×32 and the previews are big enough to see.

The testbed's safety dictionary (`safedig_core/testbed/assets/sae/`, made by
`python -m safedig_core.testbed.dictionary`) is listed by SafeDIG Load Dictionary.
"""
from __future__ import annotations

import os

import folder_paths
import torch

from ..safedig_core.testbed import ASSETS
from .api import CATEGORY, io
from .load_dictionary import FOLDER

UPSCALE = 8  # pixels per latent cell, as for the 8× VAEs of SD/FLUX


def register_dictionary_folder() -> None:
    """The shipped testbed dictionary's folder, as a (non-default) `sae` folder of ComfyUI."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(ASSETS, "sae"), is_default=False)


class TestbedCLIP:
    """The testbed text encoder as ComfyUI's CLIP-taking nodes call it."""

    def __init__(self, encoder):
        self.encoder = encoder

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"testbed": [str(text)]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        ctx, pooled = self.encoder.encode(tokens["testbed"])
        if return_dict:
            return {"cond": ctx, "pooled_output": pooled}
        return (ctx, pooled) if return_pooled else ctx

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected_t5: bool = False, add_dict: dict | None = None,
                                     show_pbar: bool = True) -> list:
        ctx, pooled = self.encoder.encode(tokens["testbed"])
        return [[ctx, {"pooled_output": pooled, **(add_dict or {})}]]

    def clone(self):
        return self


class TestbedVAE:
    """Decode: latent (RGB in [-1, 1], [B, 3, h, w]) -> IMAGE [B, 8h, 8w, 3] in [0, 1]; encode is the reverse."""

    upscale = UPSCALE

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        from ..safedig_core.testbed.model import to_image

        img = to_image(samples[:, :3])
        img = img.repeat_interleave(self.upscale, dim=-2).repeat_interleave(self.upscale, dim=-1)
        return img.permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels[..., :3].permute(0, 3, 1, 2).float()
        x = torch.nn.functional.avg_pool2d(x, self.upscale) if min(x.shape[-2:]) >= 8 * self.upscale else x
        return x * 2.0 - 1.0

    def spacial_compression_decode(self) -> int:
        return self.upscale

    def spacial_compression_encode(self) -> int:
        return self.upscale


class SafeDIGTestbedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGTestbedModel",
            display_name="SafeDIG Testbed Model",
            category=CATEGORY,
            description="The small text-to-image DiT shipped with SafeDIG (ComfyUI's FLUX class at a tiny size, "
                        "32×32 images of one object on a background), its text encoder and a pass-through VAE. "
                        "Runs on a CPU in seconds; use an Empty Latent Image of 256×256.",
            inputs=[],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        from ..safedig_core.testbed.model import load_testbed

        model, encode_fn = load_testbed()
        return io.NodeOutput(model, TestbedCLIP(encode_fn.encoder), TestbedVAE())
