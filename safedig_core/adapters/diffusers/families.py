"""Which diffusers transformer a model is, read from its class and config, and how each family's forward hands
its blocks the token streams (read from diffusers 0.42.1), so that the hooks see the positions ComfyUI's adapter
sees: the same names, the same token order, reference-image tokens left out.

| family     | class                        | blocks → positions                                      | a block returns |
| ---------- | ---------------------------- | ------------------------------------------------------- | --------------- |
| flux       | FluxTransformer2DModel       | transformer_blocks → double, single_transformer_blocks → single | (txt, img); older single blocks [txt | img] |
| chroma     | ChromaTransformer2DModel     | the same                                                | double (txt, img), single [txt | img] |
| flux2      | Flux2Transformer2DModel      | the same                                                | double (txt, img), single [txt | img] |
| sd3        | SD3Transformer2DModel        | transformer_blocks → joint                              | (txt or None, img) |
| qwen_image | QwenImageTransformer2DModel  | transformer_blocks → double                             | (txt, img)      |
| wan        | WanTransformer3DModel        | blocks → double (image stream only)                     | img             |

A joined single-block sequence is split where the call's `encoder_hidden_states` ends. The image stream is the
output image's tokens: FLUX.1 Kontext and Flux.2 put reference images among the image tokens with another first
RoPE coordinate (`img_ids[:, 0]` is 0 only for the output image), Qwen-Image edits put them after the output
image, whose size is the first entry of `img_shapes`. The DiT's text input (`input.txt`, FLUX-style families) is
the call's `encoder_hidden_states`, `joint_attention_dim` wide. The variant is the name ComfyUI's model config
gives the same weights (`Flux`, `FluxSchnell`, `Chroma`, `Flux2`, `QwenImage`, `WAN21_T2V`, ...), so that a
dictionary records and refuses the same variants in both runtimes.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...positions import FAMILY_INFO, ModelLayout, Position

# (diffusers class, family); a subclass (e.g. a test's stand-in for older diffusers) is its parent's family
CLASSES = (("FluxTransformer2DModel", "flux"), ("ChromaTransformer2DModel", "chroma"),
           ("Flux2Transformer2DModel", "flux2"), ("SD3Transformer2DModel", "sd3"),
           ("QwenImageTransformer2DModel", "qwen_image"), ("WanTransformer3DModel", "wan"))
BLOCK_LISTS = {"wan": {"double": "blocks"}}  # else double/joint: transformer_blocks, single: single_transformer_blocks
THOUSANDTHS = ("flux", "chroma", "flux2", "qwen_image")  # their pipelines pass timestep / 1000
WAN_VARIANTS = {(16, 16): "WAN21_T2V", (36, 16): "WAN21_I2V", (48, 48): "WAN22_T2V"}  # (in, out channels)


class UnsupportedTransformer(ValueError):
    """A diffusers model of a family the adapter does not hook."""


def identify(transformer) -> tuple[str, str | None]:
    """(family, variant) of a diffusers transformer, from its class and config."""
    import diffusers

    for name, family in CLASSES:
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(transformer, cls):
            return family, _variant(family, transformer.config)
    names = ", ".join(n for n, _ in CLASSES)
    raise UnsupportedTransformer(f"SafeDIG steers diffusers {names}; got a {type(transformer).__name__} "
                                 "(pass the pipeline's .transformer)")


def _variant(family: str, config) -> str | None:
    if family == "flux":
        if not config.guidance_embeds:
            return "FluxSchnell"
        return "FluxInpaint" if config.in_channels == 384 else "Flux"  # Fill: 96 latent channels in 2x2 patches
    if family == "wan":
        return WAN_VARIANTS.get((config.in_channels, config.out_channels))
    return {"chroma": "Chroma", "flux2": "Flux2", "qwen_image": "QwenImage"}.get(family)  # SD3: either SD3 or SD3.5


def layout_of(transformer) -> ModelLayout:
    """Block counts, width and variant of a diffusers transformer of a family SafeDIG hooks."""
    family, variant = identify(transformer)
    c, t = transformer.config, transformer
    width = c.num_attention_heads * c.attention_head_dim
    if family == "sd3":
        return ModelLayout("sd3", {"joint": len(t.transformer_blocks)}, width,
                           last_txt_absent=bool(t.transformer_blocks[-1].context_pre_only), variant=variant)
    if family in ("qwen_image", "wan"):
        return ModelLayout(family, {"double": len(blocks(t, family, "double"))}, width, variant=variant)
    return ModelLayout(family, {"double": len(t.transformer_blocks), "single": len(t.single_transformer_blocks)},
                       width, variant=variant, input_width=c.joint_attention_dim)


def blocks(transformer, family: str, kind: str) -> torch.nn.ModuleList:
    default = "single_transformer_blocks" if kind == "single" else "transformer_blocks"
    return getattr(transformer, BLOCK_LISTS.get(family, {}).get(kind, default))


def block_of(transformer, family: str, p: Position) -> torch.nn.Module:
    return blocks(transformer, family, p.kind)[p.index]


def model_time(family: str, timestep) -> float | None:
    """The timestep in the scheduler's units (0..1000): the FLUX-style and Qwen-Image transformers take t/1000
    (and multiply by 1000 themselves), SD3's and Wan's take the scheduler's t."""
    if timestep is None:
        return None
    t = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
    return t * 1000 if family in THOUSANDTHS else t


@dataclass
class Call:
    """What one transformer call tells the block hooks: the text length (where a joined sequence splits), the
    output image's token span among the image tokens (None: all of them) and the timestep."""
    arguments: inspect.BoundArguments
    txt_len: int | None
    img_span: tuple[int, int] | None
    timestep: float | None


def read_call(family: str, transformer, args, kwargs) -> Call:
    try:
        bound = inspect.signature(transformer.forward).bind_partial(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(transformer).__name__} was called with arguments its forward does not take: {e}") from None
    a = bound.arguments
    enc, x = a.get("encoder_hidden_states"), a.get("hidden_states")
    span = None
    if isinstance(x, Tensor) and x.ndim == 3:
        if family == "qwen_image":
            span = _first_image_span(a.get("img_shapes"), x.shape[1])
        elif a.get("img_ids") is not None:
            span = _output_image_span(a["img_ids"], x.shape[1])
    return Call(bound, None if enc is None else enc.shape[1], span, model_time(family, a.get("timestep")))


def _output_image_span(ids: Tensor, tokens: int) -> tuple[int, int] | None:
    """The tokens whose first RoPE coordinate is 0 (the output image; reference images carry their index there)."""
    ids = ids[0] if ids.ndim == 3 else ids
    out = (ids[:, 0] == 0).nonzero().flatten().tolist()
    if len(out) == tokens or not out:
        return None
    if out[-1] - out[0] + 1 != len(out):
        raise ValueError("the output image's tokens (img_ids[:, 0] == 0) are not one run among the image tokens; "
                         "SafeDIG cannot tell them from the reference images")
    return out[0], len(out)


def _first_image_span(shapes, tokens: int) -> tuple[int, int] | None:
    """Qwen-Image: `img_shapes` is [[(frames, h, w) of the output, then of each reference], ...] per sample."""
    if not shapes:
        return None
    first = shapes[0]
    first = first[0] if isinstance(first, list) else first
    n = math.prod(first)
    return None if n >= tokens else (0, n)


def unpack(family: str, out, txt_len: int | None, p: Position):
    """(txt, img, repack) of a block's output: repack(txt, img) builds the output the model expects back."""
    if FAMILY_INFO[family].streams == ("img",):
        return None, out, lambda txt, img: img
    if isinstance(out, (tuple, list)):
        return out[0], out[1], lambda txt, img: type(out)((txt, img, *out[2:]))
    if txt_len is None:  # one joined sequence [txt | img]
        raise ValueError(f"cannot split the output of {p.kind} block {p.index} into text and image: the "
                         "transformer was called without encoder_hidden_states")
    return out[:, :txt_len], out[:, txt_len:], lambda txt, img: torch.cat([txt, img], dim=1)
