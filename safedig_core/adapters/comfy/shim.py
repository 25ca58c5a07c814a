"""The block-replace protocol for DiTs whose forward has none (ComfyUI 0.3.75's NextDiT for Lumina 2 / Z-Image,
and HiDream).

FLUX-style forwards look up `transformer_options["patches_replace"]["dit"][(block_name, i)]` before each block;
NextDiT calls `layer(x, mask, freqs_cis, adaln_input, transformer_options=...)` and HiDream
`block(image_tokens=..., text_tokens=..., ..., transformer_options=...)` with no lookup. `BlockSlot` stands in
for one such block on a ModelPatcher clone (`add_object_patch`, applied while the clone is loaded and undone
after), and gives the block the same protocol under SafeDIG's own key (`SLOTS`), so the block patches of
`patches.py` serve these families unchanged and ComfyUI moves them between devices as it moves every
replace patch. A `Convention` says how one family's blocks take and return their streams.

A `BlockSlot` is a view of the block it stands in for: it shares the block's parameter, buffer and submodule
tables (the same objects, never copies), so the loader, weight patches (LoRA) and state-dict names see the
block exactly as before; only `forward` differs. The block itself is never modified. Whatever stood at that
path before (the block, or another node's object patch) is what the slot runs, so foreign patches chain.
"""
from __future__ import annotations

import torch

SLOTS = "safedig_slots"  # patches_replace key of the blocks SafeDIG gives the protocol to


class Convention:
    """NextDiT: the block takes the sequence as its first argument and returns it (`{"img": x}`)."""

    def streams(self, args: tuple, kwargs: dict, to: dict) -> dict:
        return {"img": args[0]}

    def call(self, inner, args: tuple, kwargs: dict, streams: dict):
        return inner(streams["img"], *args[1:], **kwargs)

    def split(self, out, to: dict) -> dict:
        return {"img": out}

    def join(self, out: dict):
        return out["img"]


class HiDreamDouble(Convention):
    """HiDream's double blocks: keyword `image_tokens` and `text_tokens`, returning (image, text). The text
    returned beyond the first `TOKEN_LAYOUT[0]` tokens (this block's own Llama-layer tokens) is dropped by the
    model right after the block, so the patch sees the text stream without it."""

    def streams(self, args, kwargs, to):
        return {"img": kwargs["image_tokens"], "txt": kwargs["text_tokens"]}

    def call(self, inner, args, kwargs, streams):
        return inner(*args, **{**kwargs, "image_tokens": streams["img"], "text_tokens": streams["txt"]})

    def split(self, out, to):
        from .patches import TOKEN_LAYOUT

        img, txt = out
        return {"img": img, "txt": txt[:, : to[TOKEN_LAYOUT][0]] if TOKEN_LAYOUT in to else txt}

    def join(self, out):
        return out["img"], out["txt"]


class HiDreamSingle(Convention):
    """HiDream's single blocks: keyword `image_tokens` (the joined sequence), returning it."""

    def streams(self, args, kwargs, to):
        return {"img": kwargs["image_tokens"]}

    def call(self, inner, args, kwargs, streams):
        return inner(*args, **{**kwargs, "image_tokens": streams["img"]})


CONVENTIONS = {"nextdit": Convention(), "hidream_double": HiDreamDouble(), "hidream_single": HiDreamSingle()}


class BlockSlot(torch.nn.Module):
    """Runs `inner(*args, **kwargs)`, or, when this model call carries a patch at `slot`, the patch as
    `patch({**streams, "transformer_options": to}, {"original_block": ...})` (streams per `convention`)."""

    def __init__(self, inner: torch.nn.Module, slot: tuple, convention: str = "nextdit"):
        super().__init__()
        for table in ("_parameters", "_buffers", "_modules"):
            self.__dict__[table] = inner.__dict__[table]  # shared: a view, not a copy
        self.__dict__["_safedig_inner"] = inner  # not registered: its tables are already ours
        self.slot, self.convention = tuple(slot), convention
        self.training = inner.training

    @property
    def inner(self) -> torch.nn.Module:
        return self.__dict__["_safedig_inner"]

    def forward(self, *args, **kwargs):
        to = kwargs.get("transformer_options")
        to = to if to is not None else {}
        patch = to.get("patches_replace", {}).get(SLOTS, {}).get(self.slot)
        if patch is None:
            return self.inner(*args, **kwargs)
        conv = CONVENTIONS[self.convention]

        def original(a: dict) -> dict:
            call_kwargs = {**kwargs, "transformer_options": a.get("transformer_options", to)}
            return conv.split(conv.call(self.inner, args, call_kwargs, a), to)

        return conv.join(patch({**conv.streams(args, kwargs, to), "transformer_options": to}, {"original_block": original}))


def add_slots(model, paths: dict) -> None:
    """Object-patch clone `model` so that each `paths[slot] = (path, convention)` (a dotted module path, e.g.
    "diffusion_model.layers.3") serves `slot`; a path that already carries a slot is left as it is."""
    for slot, (path, convention) in sorted(paths.items()):
        current = model.get_model_object(path)
        if isinstance(current, BlockSlot):
            continue
        model.add_object_patch(path, BlockSlot(current, slot, convention))
