"""Where one diffusers transformer call puts its tokens, and the text and image streams of a block's output in
it (read from diffusers 0.42.1), so that the hooks see what ComfyUI's adapter sees: the same tokens in the same
order, reference images and padding left out.

| family        | double block returns              | single block returns                                 |
| ------------- | --------------------------------- | ---------------------------------------------------- |
| flux, chroma, flux2 | (txt, img)                  | FLUX.1: (txt, img); Chroma, Flux.2, older FLUX.1: [txt | img] |
| sd3           | joint: (txt or None, img)         |                                                      |
| qwen_image    | (txt, img)                        |                                                      |
| wan           | img (text by cross-attention)     |                                                      |
| hunyuan_image | (img, txt)                        | (img, txt)                                           |
| lumina2       |                                   | Lumina 2: [caption | img]; Z-Image: [img | pad | caption | pad] |
| hidream       | (img, txt + the block's Llama layer) | [img | txt | the block's Llama layer]            |

The image stream is the output image's tokens: FLUX.1 Kontext and Flux.2 put reference images among the image
tokens with another first RoPE coordinate (`img_ids[:, 0]` is 0 only for the output image), Qwen-Image edits put
them after the output image, whose size is the first entry of `img_shapes`; HiDream pads a non-square image's
tokens to `max_seq`, Z-Image pads image and caption to multiples of 32 (the pads are no position). The text
stream is what the block gets as text: FLUX's `encoder_hidden_states`, HunyuanImage's refined text (with the
byT5 tokens, which diffusers puts first and ComfyUI last: the same tokens in another order), HiDream's
[T5 | last Llama layer] without the Llama layer each block appends and drops again. Z-Image's captions may
differ in length within a call (its pipeline stacks the negative prompt's); the caption then has no one place
in the batch, and a text position refuses the call.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ...positions import FAMILY_INFO, ModelLayout, Position
from .families import model_time

IMG_FIRST = ("hunyuan_image", "hidream")  # their blocks return (img, txt)
PAD = 32  # Z-Image's SEQ_MULTI_OF


@dataclass
class Call:
    """What one transformer call tells the block hooks. `txt_len`: the text tokens (where a FLUX-style joined
    sequence splits; HiDream: how many of a block's text tokens are the stream); `img_span`: the output image's
    (first token, tokens) among a block's image tokens (None: all of them); `joined`: where text and image lie in
    the joined sequence of families that do not run [txt | img]; `txt_problem`: why the text cannot be read."""
    arguments: inspect.BoundArguments
    timestep: float | None
    txt_len: int | None = None
    img_span: tuple[int, int] | None = None
    joined: dict | None = None
    txt_problem: str | None = None


def read_call(layout: ModelLayout, transformer, args, kwargs) -> Call:
    try:
        bound = inspect.signature(transformer.forward).bind_partial(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{type(transformer).__name__} was called with arguments its forward does not take: {e}") from None
    a = bound.arguments
    t = a.get("timestep", a.get("timesteps", a.get("t")))
    call = Call(bound, model_time(layout.family, t))
    if layout.family == "hidream":
        _hidream(call, transformer)
    elif layout.variant == "ZImage":
        _z_image(call, transformer)
    elif layout.family == "lumina2":
        _lumina2(call, transformer)
    elif layout.family != "hunyuan_image":
        _flux_style(call, layout.family)
    return call


def _flux_style(call: Call, family: str) -> None:
    a = call.arguments.arguments
    enc, x = a.get("encoder_hidden_states"), a.get("hidden_states")
    call.txt_len = None if enc is None else enc.shape[1]
    if isinstance(x, Tensor) and x.ndim == 3:
        if family == "qwen_image":
            call.img_span = _first_image_span(a.get("img_shapes"), x.shape[1])
        elif a.get("img_ids") is not None:
            call.img_span = _output_image_span(a["img_ids"], x.shape[1])


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


def _lumina2(call: Call, transformer) -> None:
    """Lumina 2: each sample's joined sequence is [its valid caption tokens | img | zeros up to the longest]."""
    a = call.arguments.arguments
    x, mask = a["hidden_states"], a["encoder_attention_mask"]
    p = transformer.config.patch_size
    img = (x.shape[-2] // p) * (x.shape[-1] // p)
    lengths = sorted({int(n) for n in mask.sum(dim=1).tolist()})
    if len(lengths) > 1:
        raise ValueError(f"Lumina2Transformer2DModel got captions of {lengths} valid tokens in one call: their images "
                         "start at different tokens, so SafeDIG cannot steer them together; give one prompt per call "
                         "(the Lumina 2 pipeline's own calls) or prompts of equal length")
    call.txt_len = lengths[0]
    call.joined = {"txt": (0, lengths[0]), "img": (lengths[0], img)}


def _z_image(call: Call, transformer) -> None:
    """Z-Image (basic mode): each sample's joined sequence is [img | pads | caption | pads], each padded to 32."""
    a = call.arguments.arguments
    xs, caps = a["x"], a["cap_feats"]
    if xs and isinstance(xs[0], list):
        raise ValueError("ZImageTransformer2DModel was called in omni mode (lists of images per sample); SafeDIG "
                         "steers its text-to-image calls only")
    p, f = a.get("patch_size", 2), a.get("f_patch_size", 1)
    sizes = {(x.shape[-3] // f) * (x.shape[-2] // p) * (x.shape[-1] // p) for x in xs}
    if len(sizes) > 1:
        raise ValueError(f"ZImageTransformer2DModel got images of {sorted(sizes)} tokens in one call; SafeDIG steers "
                         "images of one size per call")
    img = sizes.pop()
    start = img + (-img) % PAD
    lengths = sorted({len(c) for c in caps})
    call.joined = {"img": (0, img), "txt": (start, lengths[0]) if len(lengths) == 1 else None}
    if len(lengths) > 1:
        call.txt_problem = (f"ZImageTransformer2DModel got captions of {lengths} tokens in one call (its pipeline "
                            "stacks the negative prompt's): the text stream has no one place in the batch, so SafeDIG "
                            "cannot steer or record a text position there; use image positions, or prompts of equal length")


def _hidream(call: Call, transformer) -> None:
    """HiDream: text [T5 | last Llama layer] (+ the block's own Llama layer); a non-square image is padded to
    `max_seq` tokens (or comes patchified with `hidden_states_masks`)."""
    a = call.arguments.arguments
    x, t5, llama = a["hidden_states"], a["encoder_hidden_states_t5"], a["encoder_hidden_states_llama3"]
    call.txt_len = t5.shape[1] + llama[0].shape[1]
    p = transformer.config.patch_size
    if x.ndim == 4:
        img = (x.shape[-2] // p) * (x.shape[-1] // p)
        total = img if x.shape[-2] == x.shape[-1] else transformer.max_seq
    else:
        sizes = {int(h) * int(w) for h, w in a["img_sizes"]}
        if len(sizes) > 1:
            raise ValueError(f"HiDreamImageTransformer2DModel got images of {sorted(sizes)} tokens in one call; "
                             "SafeDIG steers images of one size per call")
        img, total = sizes.pop(), x.shape[1]
    call.img_span = None if img == total else (0, img)
    call.joined = {"img": (0, img), "txt": (total, call.txt_len)}


def _cut(x: Tensor, span) -> Tensor:
    return x if span is None else x[:, span[0]:span[0] + span[1]]


def _put(x: Tensor, span, new: Tensor) -> Tensor:
    """`x` with the tokens at `span` replaced by `new` (a new tensor; `x` stays as the block computed it)."""
    if span is None:
        return new
    return torch.cat([x[:, :span[0]], new, x[:, span[0] + span[1]:]], dim=1)


def streams_of(family: str, call: Call, out, p: Position, need) -> tuple[dict, Callable]:
    """({"txt", "img"} streams of block output `out` (None where there is none; img: the output image's tokens),
    rebuild(new streams) → the output the model expects back, every other token as it was). `need`: the streams
    the hooks read; a text stream the call cannot locate is refused only when needed."""
    if FAMILY_INFO[family].streams == ("img",):
        return {"txt": None, "img": out}, lambda new: new["img"]
    if isinstance(out, (tuple, list)):
        it, ii = (1, 0) if family in IMG_FIRST else (0, 1)
        txt_span = (0, call.txt_len) if family == "hidream" and out[it] is not None else None
        seats = {"txt": (it, txt_span), "img": (ii, call.img_span)}
        parts = list(out)

        def rebuild(new: dict):
            for k, (i, span) in seats.items():
                if parts[i] is not None and new[k] is not streams[k]:
                    parts[i] = _put(parts[i], span, new[k])
            return type(out)(parts)

        streams = {k: None if parts[i] is None else _cut(parts[i], span) for k, (i, span) in seats.items()}
        return streams, rebuild
    spans = call.joined or _flux_joined(call, out.shape[1], p)
    if "txt" in need and spans["txt"] is None:
        raise ValueError(call.txt_problem)
    streams = {k: None if span is None else _cut(out, span) for k, span in spans.items()}

    def rebuild_joined(new: dict):
        x = out
        for k, span in spans.items():
            if span is not None and new[k] is not streams[k]:
                x = _put(x, span, new[k])
        return x

    return streams, rebuild_joined


def _flux_joined(call: Call, total: int, p: Position) -> dict:
    """[txt | img | reference images]: the text is as long as the call's `encoder_hidden_states`."""
    if call.txt_len is None:
        raise ValueError(f"cannot split the output of {p.kind} block {p.index} into text and image: the "
                         "transformer was called without encoder_hidden_states")
    n = call.txt_len
    img = (n, total - n) if call.img_span is None else (n + call.img_span[0], call.img_span[1])
    return {"txt": (0, n), "img": img}
