"""Which DiT family a ComfyUI model is, read from its own classes, and what each family needs from the hooks.

The family comes from the model_base class (`comfy.model_base.Chroma`, `Flux2`, `Flux`, `SD3`), most specific
first, because Chroma and Flux2 subclass Flux and carry FLUX.1's block attributes; the variant is the
supported_models config ComfyUI recognised the checkpoint as (`Flux`, `FluxSchnell`, `Chroma`, `Flux2`, ...).
A bare diffusion model (no model_base) is told apart by its ldm class; Flux.2's ldm class is FLUX.1's, so
only a ModelPatcher or model_base tells Flux.2 apart.

Qwen-Image and Wan have only double-stream blocks (`double_block` slots); Wan's blocks return the image
stream alone. Single-stream families run one `[txt | img | reference images]` sequence in their single blocks;
`record_token_layout` (a DIFFUSION_MODEL wrapper) notes the text length and the number of output image
tokens for the block patches. It binds the forward's arguments by name, because each family passes
`transformer_options` at its own place (FLUX.1/Flux2 8th, Chroma 6th).
"""
from __future__ import annotations

import inspect

from ...positions import FAMILY_INFO, ModelLayout
from .patches import TOKEN_LAYOUT

# (model_base class name, family), most specific first: isinstance(Chroma(), Flux) holds
BASE_CLASSES = (("ChromaRadiance", None), ("Chroma", "chroma"), ("Flux2", "flux2"), ("Flux", "flux"),
                ("SD3", "sd3"), ("QwenImage", "qwen_image"), ("WAN21", "wan"))
LDM_CLASSES = (("comfy.ldm.chroma_radiance.model", "ChromaRadiance", None),
               ("comfy.ldm.chroma.model", "Chroma", "chroma"),
               ("comfy.ldm.flux.model", "Flux", "flux"),
               ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT", "sd3"),
               ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", "qwen_image"),
               ("comfy.ldm.wan.model", "WanModel", "wan"))
TOKEN_LAYOUT_FAMILIES = ("flux", "chroma", "flux2", "qwen_image")  # a single stream, or reference images after img


class UnsupportedModel(ValueError):
    """A model of a family SafeDIG does not hook."""


def _model_base(model):
    """The model_base of a ModelPatcher or a model_base itself; None for a bare diffusion model."""
    import comfy.model_base

    inner = getattr(model, "model", model)
    return inner if isinstance(inner, comfy.model_base.BaseModel) else None


def identify(model) -> tuple[str, str | None]:
    """(family, variant) of a ModelPatcher, a model_base or a bare diffusion model."""
    import importlib

    import comfy.model_base

    base = _model_base(model)
    if base is not None:
        for name, family in BASE_CLASSES:
            cls = getattr(comfy.model_base, name, None)
            if cls is not None and isinstance(base, cls):
                if family is None:
                    break
                return family, type(base.model_config).__name__
        raise UnsupportedModel(_unsupported(type(base).__name__))
    for module, name, family in LDM_CLASSES:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(model, cls):
            if family is None:
                break
            return family, None
    raise UnsupportedModel(_unsupported(type(model).__name__))


def _unsupported(name: str) -> str:
    known = ", ".join(f.label for f in FAMILY_INFO.values())
    return f"SafeDIG steers {known} models; this model is a {name}"


def layout_of(model) -> ModelLayout:
    """The DiT layout of a ModelPatcher, a model_base or a bare diffusion model."""
    family, variant = identify(model)
    base = _model_base(model)
    dm = base.diffusion_model if base is not None else model
    if family == "sd3":
        last = dm.joint_blocks[-1].context_block
        return ModelLayout("sd3", {"joint": len(dm.joint_blocks)}, dm.hidden_size,
                           last_txt_absent=bool(getattr(last, "pre_only", False)), variant=variant)
    if family == "qwen_image":
        return ModelLayout(family, {"double": len(dm.transformer_blocks)}, dm.inner_dim, variant=variant)
    if family == "wan":
        return ModelLayout(family, {"double": len(dm.blocks)}, dm.dim, variant=variant)
    return ModelLayout(family, {"double": len(dm.double_blocks), "single": len(dm.single_blocks)},
                       dm.params.hidden_size, variant=variant)


def needs_token_layout(family: str) -> bool:
    return family in TOKEN_LAYOUT_FAMILIES


def _bound(executor, args, kwargs) -> dict:
    fn = getattr(executor, "original", None) or executor.class_obj._forward
    try:
        return inspect.signature(fn).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return {}


def record_token_layout(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: note (text tokens, output image tokens) in transformer_options for the single
    blocks of FLUX.1, Chroma and Flux.2 and for Qwen-Image's image stream. Text tokens = the context as the DiT
    receives it (Flux.2's left-padded to 512 by its extra_conds); image tokens = the patchified output latent
    (reference images come after; Qwen-Image's latent is [B, C, 1, H, W])."""
    a = _bound(executor, args, kwargs)
    to, x, context = a.get("transformer_options"), a.get("x"), a.get("context")
    if isinstance(to, dict) and x is not None and context is not None:
        p = executor.class_obj.patch_size
        h, w = x.shape[-2:]
        to[TOKEN_LAYOUT] = (context.shape[1], ((h + p // 2) // p) * ((w + p // 2) // p))
    return executor(*args, **kwargs)
