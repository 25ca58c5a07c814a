"""Steering inside ComfyUI's DiT block-replace protocol, without importing ComfyUI.

ComfyUI's FLUX and MMDiT forward passes look up `transformer_options["patches_replace"]["dit"]
[(block_name, i)]` and call it as `patch(args, {"original_block": fn})`, expecting back a dict with
`img` (and `txt` for double/joint blocks). `BlockSteering` is such a patch: it runs the block (or the
patch it displaced, so foreign patches keep working), then steers the routed streams of its output.

FLUX single blocks carry one sequence `[txt | img | reference images]`; the split comes from
`transformer_options["img_slice"]` (newer ComfyUI) or from `record_token_layout`, a diffusion-model
wrapper that notes the text length and the number of output image tokens. Reference-image tokens
(Kontext) are never steered.
"""
from __future__ import annotations

import copy

import torch

from .positions import Position
from .steering import PositionSteerer, SteeringConfig, half_rows, in_window, schedule_progress

TOKEN_LAYOUT = "safedig_token_layout"  # transformer_options key: (text tokens, output image tokens)
WRAPPER_KEY = "safedig"


class SteeringStore:
    """The loaded SAEs of one dictionary, shared by every block patch and every clone of the model:
    `copy.deepcopy` (which `ModelPatcher.clone()` applies to model options) returns the same store."""

    def __init__(self, steerers: dict[Position, PositionSteerer]):
        self.steerers = steerers

    def to(self, device_or_dtype):
        for st in self.steerers.values():
            if isinstance(device_or_dtype, torch.dtype):
                st.to(dtype=device_or_dtype)
            else:
                st.to(device=device_or_dtype)
        return self

    def __deepcopy__(self, memo):
        return self


class BlockSteering:
    """The `patches_replace["dit"]` entry for one block: runs the block, then steers its streams."""

    def __init__(self, store: SteeringStore, positions: list[Position], cfg: SteeringConfig, previous=None):
        kinds = {p.kind for p in positions}
        slots = {p.slot for p in positions}
        if len(slots) != 1:
            raise ValueError(f"one BlockSteering serves one block, got {sorted(map(str, positions))}")
        self.store, self.positions, self.cfg, self.previous = store, positions, cfg, previous
        self.single = kinds == {"single"}

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        to = args.get("transformer_options") or {}
        if not in_window(schedule_progress(to.get("sigmas"), to.get("sample_sigmas")), self.cfg):
            return out
        out = dict(out)
        if self.single:
            out["img"] = self._steer_single(out["img"], to)
        else:
            for p in self.positions:
                x = out.get(p.stream)
                if x is None:  # MMDiT's last block returns no text
                    continue
                stop = x.shape[1]
                if p.stream == "img" and TOKEN_LAYOUT in to:
                    stop = min(stop, to[TOKEN_LAYOUT][1])  # reference-image tokens follow the image
                out[p.stream] = self._steer_span(x, p, 0, stop, to)
        return out

    def _steer_single(self, x, to):
        txt_len, img_len = token_layout(to, x.shape[1])
        spans = {"txt": (0, txt_len), "img": (txt_len, txt_len + img_len)}
        for p in self.positions:
            x = self._steer_span(x, p, *spans[p.stream], to)
        return x

    def _steer_span(self, x, p: Position, start: int, stop: int, to):
        if stop <= start:
            return x
        rows = half_rows(x.shape[0], to.get("cond_or_uncond"), self.cfg.apply_to)
        part = x if (start, stop) == (0, x.shape[1]) else x[:, start:stop]
        steered = self.store.steerers[p].steer(part, self.cfg, rows)
        if steered is part:
            return x
        if part is x:
            return steered
        x = x.clone()
        x[:, start:stop] = steered
        return x

    def to(self, device_or_dtype):
        self.store.to(device_or_dtype)
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self):
        return self.previous.models() if hasattr(self.previous, "models") else []

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.previous = copy.deepcopy(self.previous, memo)
        return new


def token_layout(to: dict, total: int) -> tuple[int, int]:
    """(text tokens, output image tokens) of a single-stream sequence of `total` tokens."""
    img_len = None
    if TOKEN_LAYOUT in to:
        txt_len, img_len = to[TOKEN_LAYOUT]
    elif "img_slice" in to:
        txt_len = to["img_slice"][0]
    else:
        raise ValueError("cannot split the single-block sequence into text and image tokens: the model call "
                         "carries neither transformer_options['img_slice'] nor SafeDIG's token layout")
    if img_len is None:
        img_len = total - txt_len
    return txt_len, min(img_len, total - txt_len)


def record_token_layout(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper for FLUX: note (text tokens, output image tokens) for the block patches.
    FLUX's forward is (x, timestep, context, y, guidance, ref_latents, control, transformer_options)."""
    to = args[7] if len(args) > 7 else kwargs.get("transformer_options")
    x, context = args[0], args[2] if len(args) > 2 else kwargs.get("context")
    if isinstance(to, dict) and context is not None:
        p = executor.class_obj.patch_size
        h, w = x.shape[-2:]
        to[TOKEN_LAYOUT] = (context.shape[1], ((h + p // 2) // p) * ((w + p // 2) // p))
    return executor(*args, **kwargs)


def install(set_patch, get_patch, store: SteeringStore, positions: list[Position], cfg: SteeringConfig) -> list:
    """Install one BlockSteering per block slot through the model patcher's own setters:
    `get_patch(slot)` returns the patch already there (or None), `set_patch(patch, slot)` sets one.
    Returns the installed patches."""
    by_slot: dict = {}
    for p in positions:
        by_slot.setdefault(p.slot, []).append(p)
    installed = []
    for slot, ps in sorted(by_slot.items()):
        patch = BlockSteering(store, ps, cfg, previous=get_patch(slot))
        set_patch(patch, slot)
        installed.append(patch)
    return installed
