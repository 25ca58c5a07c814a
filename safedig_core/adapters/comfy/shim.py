"""The block-replace protocol for DiTs whose forward has none (Lumina 2 / Z-Image's NextDiT in ComfyUI 0.3.75).

FLUX-style forwards look up `transformer_options["patches_replace"]["dit"][(block_name, i)]` before each block;
NextDiT just calls `layer(x, mask, freqs_cis, adaln_input, transformer_options=...)`. `BlockSlot` stands in for
one such layer on a ModelPatcher clone (`add_object_patch`, applied while the clone is loaded and undone after),
and gives the layer the same protocol under SafeDIG's own key (`SLOTS`), so the block patches of `patches.py`
serve these families unchanged and ComfyUI moves them between devices as it moves every replace patch.

A `BlockSlot` is a view of the layer it stands in for: it shares the layer's parameter, buffer and submodule
tables (the same objects, never copies), so the loader, weight patches (LoRA) and state-dict names see the
layer exactly as before; only `forward` differs. The layer itself is never modified. Whatever stood at that
path before (the layer, or another node's object patch) is what the slot runs, so foreign patches chain.
"""
from __future__ import annotations

import torch

SLOTS = "safedig_slots"  # patches_replace key of the blocks SafeDIG gives the protocol to


class BlockSlot(torch.nn.Module):
    """Runs `inner(x, *args, **kwargs)`, or, when this model call carries a patch at `slot`, the patch as
    `patch({"img": x, "transformer_options": to}, {"original_block": ...})`, returning its `img`."""

    def __init__(self, inner: torch.nn.Module, slot: tuple):
        super().__init__()
        for table in ("_parameters", "_buffers", "_modules"):
            self.__dict__[table] = inner.__dict__[table]  # shared: a view, not a copy
        self.__dict__["_safedig_inner"] = inner  # not registered: its tables are already ours
        self.slot = tuple(slot)
        self.training = inner.training

    @property
    def inner(self) -> torch.nn.Module:
        return self.__dict__["_safedig_inner"]

    def forward(self, x, *args, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        patch = to.get("patches_replace", {}).get(SLOTS, {}).get(self.slot)
        if patch is None:
            return self.inner(x, *args, transformer_options=to, **kwargs)

        def original(a: dict) -> dict:
            return {"img": self.inner(a["img"], *args, transformer_options=a.get("transformer_options", to), **kwargs)}

        return patch({"img": x, "transformer_options": to}, {"original_block": original})["img"]


def add_slots(model, paths: dict) -> None:
    """Object-patch clone `model` so that each `paths[slot]` (a dotted module path, e.g.
    "diffusion_model.layers.3") serves `slot`; a path that already carries a slot is left as it is."""
    for slot, path in sorted(paths.items()):
        current = model.get_model_object(path)
        if isinstance(current, BlockSlot):
            continue
        model.add_object_patch(path, BlockSlot(current, slot))
