"""Which diffusers transformer a model is, read from its class and config, and where its blocks are, so that the
hooks see the positions ComfyUI's adapter sees (how each call lays out its tokens: `tokens.py`).

| family        | class                           | blocks → positions                                        |
| ------------- | ------------------------------- | --------------------------------------------------------- |
| flux          | FluxTransformer2DModel          | transformer_blocks → double, single_transformer_blocks → single |
| chroma        | ChromaTransformer2DModel        | the same                                                  |
| flux2         | Flux2Transformer2DModel         | the same                                                  |
| sd3           | SD3Transformer2DModel           | transformer_blocks → joint                                |
| qwen_image    | QwenImageTransformer2DModel     | transformer_blocks → double                               |
| wan           | WanTransformer3DModel           | blocks → double (image stream only)                       |
| hunyuan_image | HunyuanImageTransformer2DModel  | transformer_blocks → double, single_transformer_blocks → single |
| lumina2       | Lumina2Transformer2DModel, ZImageTransformer2DModel | layers → single (refiners are no positions) |
| hidream       | HiDreamImageTransformer2DModel  | double_stream_blocks → double, single_stream_blocks → single |

The variant is the name ComfyUI's model config gives the same weights (`Flux`, `FluxSchnell`, `Chroma`, `Flux2`,
`QwenImage`, `WAN21_T2V`, `HunyuanImage21`, `Lumina2`, `ZImage`, `HiDream`, ...), so that a dictionary records and
refuses the same variants in both runtimes. The DiT's text input (`input.txt`, FLUX-style families) is the call's
`encoder_hidden_states`, `joint_attention_dim` wide.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...positions import ModelLayout, Position

# (diffusers class, family); a subclass (e.g. a test's stand-in for older diffusers) is its parent's family
CLASSES = (("FluxTransformer2DModel", "flux"), ("ChromaTransformer2DModel", "chroma"),
           ("Flux2Transformer2DModel", "flux2"), ("SD3Transformer2DModel", "sd3"),
           ("QwenImageTransformer2DModel", "qwen_image"), ("WanTransformer3DModel", "wan"),
           ("HunyuanImageTransformer2DModel", "hunyuan_image"), ("Lumina2Transformer2DModel", "lumina2"),
           ("ZImageTransformer2DModel", "lumina2"), ("HiDreamImageTransformer2DModel", "hidream"))
# else double/joint: transformer_blocks, single: single_transformer_blocks
BLOCK_LISTS = {"wan": {"double": "blocks"}, "lumina2": {"single": "layers"},
               "hidream": {"double": "double_stream_blocks", "single": "single_stream_blocks"}}
THOUSANDTHS = ("flux", "chroma", "flux2", "qwen_image")  # their pipelines pass timestep / 1000
REVERSED = ("lumina2",)  # Lumina 2's and Z-Image's pipelines pass 1 - timestep / 1000
WAN_VARIANTS = {(16, 16): "WAN21_T2V", (36, 16): "WAN21_I2V", (48, 48): "WAN22_T2V"}  # (in, out channels)


class UnsupportedTransformer(ValueError):
    """A diffusers model of a family the adapter does not hook."""


def identify(transformer) -> tuple[str, str | None]:
    """(family, variant) of a diffusers transformer, from its class and config."""
    import diffusers

    for name, family in CLASSES:
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(transformer, cls):
            return family, _variant(family, name, transformer.config)
    names = ", ".join(n for n, _ in CLASSES)
    raise UnsupportedTransformer(f"SafeDIG steers diffusers {names}; got a {type(transformer).__name__} "
                                 "(pass the pipeline's .transformer)")


def _variant(family: str, cls: str, config) -> str | None:
    if family == "flux":
        if not config.guidance_embeds:
            return "FluxSchnell"
        return "FluxInpaint" if config.in_channels == 384 else "Flux"  # Fill: 96 latent channels in 2x2 patches
    if family == "wan":
        return WAN_VARIANTS.get((config.in_channels, config.out_channels))
    if family == "hunyuan_image":  # the refiner patchifies frames too
        return "HunyuanImage21Refiner" if len(config.patch_size) == 3 else "HunyuanImage21"
    if family == "lumina2":
        return "ZImage" if cls == "ZImageTransformer2DModel" else "Lumina2"
    return {"chroma": "Chroma", "flux2": "Flux2", "qwen_image": "QwenImage", "hidream": "HiDream"}.get(family)  # SD3: SD3 or SD3.5


def layout_of(transformer) -> ModelLayout:
    """Block counts, width and variant of a diffusers transformer of a family SafeDIG hooks."""
    family, variant = identify(transformer)
    c, t = transformer.config, transformer
    if family == "sd3":
        return ModelLayout("sd3", {"joint": len(t.transformer_blocks)}, c.num_attention_heads * c.attention_head_dim,
                           last_txt_absent=bool(t.transformer_blocks[-1].context_pre_only), variant=variant)
    if family in ("qwen_image", "wan"):
        return ModelLayout(family, {"double": len(blocks(t, family, "double"))}, c.num_attention_heads * c.attention_head_dim,
                           variant=variant)
    if family == "lumina2":
        width = c.dim if variant == "ZImage" else c.hidden_size
        return ModelLayout(family, {"single": len(blocks(t, family, "single"))}, width, variant=variant)
    counts = {"double": len(blocks(t, family, "double")), "single": len(blocks(t, family, "single"))}
    width = c.num_attention_heads * c.attention_head_dim
    if family in ("hunyuan_image", "hidream"):
        return ModelLayout(family, counts, width, variant=variant)
    return ModelLayout(family, counts, width, variant=variant, input_width=c.joint_attention_dim)


def blocks(transformer, family: str, kind: str) -> torch.nn.ModuleList:
    default = "single_transformer_blocks" if kind == "single" else "transformer_blocks"
    return getattr(transformer, BLOCK_LISTS.get(family, {}).get(kind, default))


def block_of(transformer, family: str, p: Position) -> torch.nn.Module:
    return blocks(transformer, family, p.kind)[p.index]


def model_time(family: str, timestep) -> float | None:
    """The timestep in the scheduler's units (0..1000): the FLUX-style and Qwen-Image transformers take t/1000
    (and multiply by 1000 themselves), Lumina 2 and Z-Image 1 - t/1000, the others the scheduler's t."""
    if timestep is None:
        return None
    t = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
    if family in REVERSED:
        return (1.0 - t) * 1000
    return t * 1000 if family in THOUSANDTHS else t
