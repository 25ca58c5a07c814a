"""Which DiT family a ComfyUI model is, read from its own classes, and what each family needs from the hooks.

The family comes from the model_base class (`comfy.model_base.Chroma`, `Flux2`, `Flux`, `SD3`), most specific
first, because Chroma and Flux2 subclass Flux and carry FLUX.1's block attributes; the variant is the
supported_models config ComfyUI recognised the checkpoint as (`Flux`, `FluxSchnell`, `Chroma`, `Flux2`, ...).
A bare diffusion model (no model_base) is told apart by its ldm class; Flux.2's ldm class is FLUX.1's, so
only a ModelPatcher or model_base tells Flux.2 apart.

Qwen-Image and Wan have only double-stream blocks (`double_block` slots); Wan's blocks return the image
stream alone. Single-stream families run one `[txt | img | reference images]` sequence in their single blocks;
`record_token_layout` (a DIFFUSION_MODEL wrapper) notes the text length and the number of output image
tokens for the block patches (and, for Z-Image, where its padded caption ends). It binds the forward's
arguments by name, because each family passes `transformer_options` at its own place (FLUX.1/Flux2 8th,
Chroma 6th, NextDiT among its keyword arguments).

HunyuanImage 2.1 runs its single blocks over [img | txt], image first (`record_hunyuan_layout`); so does
HiDream (`record_hidream_layout`), whose blocks, like NextDiT's, get the protocol from `shim.BlockSlot`.
Lumina 2 / Z-Image (NextDiT) has no block-replace lookup; its layers get one from `shim.BlockSlot` on the
clone (`SHIMMED`, `add_block_slots`), and its patches go under `patch_key(family)`.
"""
from __future__ import annotations

import inspect
import weakref

from ...positions import FAMILY_INFO, INPUT_KINDS, ModelLayout
from .patches import TOKEN_LAYOUT

# (model_base class name, family), most specific first: isinstance(Chroma(), Flux) holds
BASE_CLASSES = (("ChromaRadiance", None), ("Chroma", "chroma"), ("Flux2", "flux2"), ("Flux", "flux"),
                ("SD3", "sd3"), ("QwenImage", "qwen_image"), ("WAN21", "wan"), ("Lumina2", "lumina2"),
                ("HunyuanImage21", "hunyuan_image"), ("HiDream", "hidream"))
LDM_CLASSES = (("comfy.ldm.chroma_radiance.model", "ChromaRadiance", None),
               ("comfy.ldm.chroma.model", "Chroma", "chroma"),
               ("comfy.ldm.flux.model", "Flux", "flux"),
               ("comfy.ldm.modules.diffusionmodules.mmdit", "MMDiT", "sd3"),
               ("comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel", "qwen_image"),
               ("comfy.ldm.wan.model", "WanModel", "wan"),
               ("comfy.ldm.lumina.model", "NextDiT", "lumina2"),
               ("comfy.ldm.hunyuan_video.model", "HunyuanVideo", "hunyuan_image"),
               ("comfy.ldm.hidream.model", "HiDreamImageTransformer2DModel", "hidream"))
TOKEN_LAYOUT_FAMILIES = ("flux", "chroma", "flux2", "qwen_image", "lumina2", "hunyuan_image")  # a single stream, or reference images after img
# families whose forward has no patches_replace["dit"]: block kind -> (the ModuleList that shim.BlockSlot
# serves, the shim's calling convention for its blocks)
SHIMMED = {"lumina2": {"single": ("diffusion_model.layers", "nextdit")},
           "hidream": {"double": ("diffusion_model.double_stream_blocks", "hidream_double"),
                       "single": ("diffusion_model.single_stream_blocks", "hidream_single")}}


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
    if family == "lumina2":
        return ModelLayout(family, {"single": len(dm.layers)}, dm.dim, variant=variant)
    if family == "hunyuan_image":
        return ModelLayout(family, {"double": len(dm.double_blocks), "single": len(dm.single_blocks)},
                           dm.hidden_size, variant=variant)
    if family == "hidream":
        return ModelLayout(family, {"double": len(dm.double_stream_blocks), "single": len(dm.single_stream_blocks)},
                           dm.inner_dim, variant=variant)
    return ModelLayout(family, {"double": len(dm.double_blocks), "single": len(dm.single_blocks)},
                       dm.params.hidden_size, variant=variant, input_width=dm.params.context_in_dim,
                       pooled_width=getattr(dm.params, "vec_in_dim", None) if hasattr(dm, "vector_in") else None)


# spatial downscale of the VAEs whose ComfyUI 0.3.75 latent format does not say it (newer ComfyUI's latent
# formats carry `spacial_downscale_ratio`); every other family's VAE downsamples 8x
DOWNSCALE = {"flux2": 16, "hunyuan_image": 32}


def latent_shape(model, width: int, height: int) -> tuple:
    """The empty latent of one `width` x `height` image for `model`, without the batch: channels and
    dimensions from its latent format (Qwen-Image and Wan: [C, 1, H, W]), the downscale from the format
    where it says it, else from the family (Flux.2 16x, HunyuanImage 2.1 32x, others 8x)."""
    fmt = model.get_model_object("latent_format")
    ratio = getattr(fmt, "spacial_downscale_ratio", None) or DOWNSCALE.get(identify(model)[0], 8)
    extra = (1,) * (int(getattr(fmt, "latent_dimensions", 2)) - 2)
    return (int(fmt.latent_channels), *extra, height // ratio, width // ratio)


def needs_token_layout(family: str) -> bool:
    return family in TOKEN_LAYOUT_FAMILIES


def token_layout_wrapper(family: str):
    """The DIFFUSION_MODEL wrapper that notes the family's token layout, or None where none is needed."""
    if family == "hunyuan_image":
        return record_hunyuan_layout
    if family == "hidream":
        return record_hidream_layout
    return record_token_layout if needs_token_layout(family) else None


def patch_key(family: str, slot: tuple) -> str:
    """The `patches_replace` key a block patch at `slot` goes under: ComfyUI's "dit", or SafeDIG's own where
    `shim.BlockSlot` gives the blocks the protocol and for the DiT's inputs (`steer_inputs`)."""
    from .shim import SLOTS

    return SLOTS if family in SHIMMED or slot[0] in INPUT_KINDS else "dit"


def add_block_slots(model, family: str, positions) -> None:
    """On clone `model`, give the blocks of `positions` the block-replace protocol where the family lacks it."""
    from .shim import add_slots

    kinds = SHIMMED.get(family)
    if kinds:
        add_slots(model, {p.slot: (f"{kinds[p.kind][0]}.{p.index}", kinds[p.kind][1]) for p in positions if p.kind in kinds})


_signatures: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _signature(fn) -> inspect.Signature:
    """`inspect.signature(fn)`, computed once per function (the wrappers run at every model call); a bound
    method's is its function's without the first parameter."""
    func = getattr(fn, "__func__", fn)
    try:
        sigs = _signatures.get(func)
    except TypeError:  # not weak-referenceable: no cache
        return inspect.signature(fn)
    if sigs is None:
        sig = inspect.signature(func)
        sigs = _signatures[func] = (sig, sig.replace(parameters=list(sig.parameters.values())[1:]))
    return sigs[0] if func is fn else sigs[1]


def _binding(executor, args, kwargs):
    fn = getattr(executor, "original", None) or executor.class_obj._forward
    try:
        return _signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def _arguments(b) -> dict:
    if b is None:
        return {}
    bound = dict(b.arguments)
    extra = bound.pop("kwargs", None)  # NextDiT takes transformer_options among **kwargs
    return {**extra, **bound} if isinstance(extra, dict) else bound


def _bound(executor, args, kwargs) -> dict:
    return _arguments(_binding(executor, args, kwargs))


def steer_inputs(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper serving the DiT's inputs: hands the `context` argument (`input.txt`, the
    conditioning tokens as the DiT receives them) and then the `y` argument (`input.pooled`, the pooled text
    vector [B, d], as one token per image) to the patches at their `Position.slot` under `shim.SLOTS`, each as a
    block patch `{"txt": ...}` whose block is the identity, and runs the DiT on what they return."""
    from .shim import SLOTS

    b = _binding(executor, args, kwargs)
    to = _arguments(b).get("transformer_options")
    patches = to.get("patches_replace", {}).get(SLOTS, {}) if isinstance(to, dict) else {}
    changed = False
    for slot, arg in ((("input", 0), "context"), (("pooled", 0), "y")):
        patch, x = patches.get(slot), b.arguments.get(arg) if b is not None else None
        if patch is None or x is None:
            continue
        one = x.dim() == 2  # the pooled vector: one token per image
        out = patch({"txt": x[:, None] if one else x, "transformer_options": to},
                    {"original_block": lambda a: {"txt": a["txt"]}})["txt"]
        b.arguments[arg] = out[:, 0] if one else out
        changed = True
    return executor(*b.args, **b.kwargs) if changed else executor(*args, **kwargs)


def record_token_layout(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: note (text tokens, output image tokens) in transformer_options for the single
    blocks of FLUX.1, Chroma and Flux.2 and for Qwen-Image's image stream. Text tokens = the context as the DiT
    receives it (Flux.2's left-padded to 512 by its extra_conds); image tokens = the patchified output latent
    (reference images come after; Qwen-Image's latent is [B, C, 1, H, W])."""
    a = _bound(executor, args, kwargs)
    to, x, context = a.get("transformer_options"), a.get("x"), a.get("context")
    if isinstance(to, dict) and x is not None and context is not None:
        dm = executor.class_obj
        p = dm.patch_size
        h, w = x.shape[-2:]
        txt, img = context.shape[1], ((h + p // 2) // p) * ((w + p // 2) // p)
        pad = getattr(dm, "pad_tokens_multiple", None)  # Z-Image: caption padded, image follows the pads
        to[TOKEN_LAYOUT] = (txt, img, txt + (-txt) % pad) if pad else (txt, img)
    return executor(*args, **kwargs)


def _tokens(shape, patch) -> int:
    n = 1
    for size, p in zip(shape[-len(patch):], patch):
        n *= (size + p // 2) // p
    return n


def record_hunyuan_layout(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper for HunyuanImage 2.1: its image stream is [reference images | img], its text
    stream [txt | byT5] and its single-stream sequence [reference images | img | txt], image first."""
    a = _bound(executor, args, kwargs)
    to, x, context = a.get("transformer_options"), a.get("x"), a.get("context")
    if isinstance(to, dict) and x is not None and context is not None:
        dm = executor.class_obj
        byt5, ref = a.get("txt_byt5"), a.get("ref_latent")
        txt = context.shape[1] + (byt5.shape[1] if byt5 is not None and getattr(dm, "byt5_in", None) is not None else 0)
        img = _tokens(x.shape, dm.patch_size)
        refs = 0 if ref is None else _tokens(ref.shape, dm.patch_size)
        to[TOKEN_LAYOUT] = (txt, img, refs, refs + img, refs)
    return executor(*args, **kwargs)


def record_hidream_layout(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper for HiDream: its text stream is [T5 | last Llama layer] (each block appends its
    own Llama layer's tokens and the model drops them after the block: never a position), its single-stream
    sequence [img | text | that block's Llama tokens], image first."""
    a = _bound(executor, args, kwargs)
    to, x, context, llama = (a.get(k) for k in ("transformer_options", "x", "context", "encoder_hidden_states_llama3"))
    if isinstance(to, dict) and x is not None and context is not None and llama is not None:
        p = executor.class_obj.patch_size
        img = _tokens(x.shape, (p, p))
        to[TOKEN_LAYOUT] = (context.shape[1] + llama.shape[2], img, 0, img, 0)
    return executor(*args, **kwargs)
