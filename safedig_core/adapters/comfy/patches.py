"""Steering inside ComfyUI's DiT block-replace protocol, without importing ComfyUI.

ComfyUI's FLUX and MMDiT forward passes look up `transformer_options["patches_replace"]["dit"]
[(block_name, i)]` and call it as `patch(args, {"original_block": fn})`, expecting back a dict with
`img` (and `txt` for double/joint blocks). `BlockSteering` is such a patch: it runs the block (or the
patch it displaced, so foreign patches keep working), then steers the routed streams of its output.

FLUX single blocks carry one sequence `[txt | img | reference images]`; the split comes from
`transformer_options["img_slice"]` (newer ComfyUI) or from `record_token_layout`, a diffusion-model
wrapper that notes the text length and the number of output image tokens. Reference-image tokens
(Kontext) are never steered.

The per-image gate's decision (`gate.py`) travels between the blocks of one model call in
`transformer_options[GATE]`, which ComfyUI builds afresh for every model call and hands to every block;
each `steer_model` installation keeps its own entry there, so chained Apply Steering nodes decide apart.
"""
from __future__ import annotations

import copy

import torch

from ...gate import CallDecision, CarriedDecision, GatePlan, steer_block
from ...positions import Position
from ...schedule import half_rows, in_window, schedule_progress, schedule_step
from ...steering import PositionSteerer, SteeringConfig

TOKEN_LAYOUT = "safedig_token_layout"  # transformer_options key: (text tokens, output image tokens[, image start])
SCHEDULE = "safedig_schedule"  # transformer_options key: (sigmas, step, progress) of this model call
GATE = "safedig_gate"  # transformer_options key: {SharedGate: CallDecision} of this model call
WRAPPER_KEY = "safedig"


class SharedSteerers:
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


class SharedGate:
    """The gate plan of one `steer_model` installation, shared by its block patches and their clones; its
    per-call decision is kept in the model call's `transformer_options` under this object, and the latest one
    of the running sampler for the DiT's inputs (`gate.CarriedDecision`), forgotten at each run's first step."""

    def __init__(self, plan: GatePlan):
        self.plan = plan
        self.last = CarriedDecision()

    def call(self, to: dict) -> CallDecision:
        return to.setdefault(GATE, {}).setdefault(self, CallDecision())

    def carried(self, to: dict, batch: int):
        """The previous call's decision for this call's rows; None (and forgotten) at a run's first step or
        where the step is not known."""
        step = step_of(to)
        if step is None or step == 0:
            self.last.clear()
            return None
        return self.last.rows_for(batch, to.get("cond_or_uncond"))

    def __deepcopy__(self, memo):
        return self


class _BlockPatch:
    """What SafeDIG's block patches share: they run the patch they displaced (or the block itself), pass
    the model's device/dtype moves on to it, and copy cheaply on `ModelPatcher.clone()`."""

    previous = None

    def run_block(self, args: dict, extra: dict) -> dict:
        return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)

    def to(self, device_or_dtype):
        if hasattr(self.previous, "to"):
            self.previous = self.previous.to(device_or_dtype)
        return self

    def models(self):
        return self.previous.models() if hasattr(self.previous, "models") else []

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.previous = copy.deepcopy(self.previous, memo)
        return new


class BlockSteering(_BlockPatch):
    """The `patches_replace["dit"]` entry for one block: runs the block, then steers its streams. `positions`:
    those of this block that act or detect (`gate.plan`; default: all act, each deciding for itself)."""

    def __init__(self, store: SharedSteerers, positions: list[Position], cfg: SteeringConfig, previous=None,
                 gate: SharedGate | None = None):
        slots = {p.slot for p in positions}
        if len(slots) != 1:
            raise ValueError(f"one BlockSteering serves one block, got {sorted(map(str, positions))}")
        self.store, self.positions, self.cfg, self.previous = store, positions, cfg, previous
        self.gate = gate or SharedGate(GatePlan(tuple(positions)))

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.run_block(args, extra)
        to = args.get("transformer_options") or {}
        if self.cfg.is_identity or not in_window(progress_of(to), self.cfg):
            return out
        out = dict(out)
        spans, parts = {}, {}
        for p in self.positions:
            span = stream_span(p, out, to)
            if span is not None and span[2] > span[1]:
                key, start, stop = spans[p] = span
                x = out[key]
                parts[p] = x if (start, stop) == (0, x.shape[1]) else x[:, start:stop]
        plan = self.gate.plan
        call = self.gate.call(to) if plan.shared else None
        carried = None
        if plan.own and any(p in plan.own for p in parts):
            carried = self.gate.carried(to, next(x.shape[0] for p, x in parts.items() if p in plan.own))
        steered = steer_block(parts, self.store.steerers, self.cfg, plan, call,
                              lambda x: half_rows(x.shape[0], to.get("cond_or_uncond"), self.cfg.apply_to),
                              to.get("cond_or_uncond"), carried)
        if plan.own and any(p in plan.detectors for p in parts):
            self.gate.last.keep(call.rows(), to.get("cond_or_uncond"))
        cloned = set()
        for p, y in steered.items():
            if y is parts[p]:
                continue
            key, start, stop = spans[p]
            if (start, stop) == (0, out[key].shape[1]):
                out[key] = y
                continue
            if key not in cloned:  # the block's own output stays as it was
                out[key] = out[key].clone()
                cloned.add(key)
            out[key][:, start:stop] = y
        return out

    def to(self, device_or_dtype):
        self.store.to(device_or_dtype)
        return super().to(device_or_dtype)


class BlockRecorder(_BlockPatch):
    """A `patches_replace["dit"]` entry that hands the block's routed streams to `record(position, x, to)`
    (x: [B, tokens, d], image tokens without reference images) and returns the output unchanged."""

    def __init__(self, record, positions: list[Position], previous=None):
        self.record, self.positions, self.previous = record, positions, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        out = self.run_block(args, extra)
        to = args.get("transformer_options") or {}
        for p in self.positions:
            span = stream_span(p, out, to)
            if span is not None:
                key, start, stop = span
                self.record(p, out[key][:, start:stop], to)
        return out


def _schedule_of(to: dict) -> tuple:
    """(sigmas, step, progress) of the current model call, computed once per call rather than once per patched
    block (it copies the schedule to the CPU). Cached with the call's own sigmas tensor, so a dict reused
    across calls never serves a stale value."""
    sigmas = to.get("sigmas")
    cached = to.get(SCHEDULE)
    if cached is None or cached[0] is not sigmas:
        sample = to.get("sample_sigmas")
        cached = to[SCHEDULE] = (sigmas, schedule_step(sigmas, sample), schedule_progress(sigmas, sample))
    return cached


def progress_of(to: dict) -> float | None:
    """Schedule progress of the current model call (`steering.schedule_progress`), cached per call."""
    return _schedule_of(to)[2]


def step_of(to: dict) -> int | None:
    """Sampler step of the current model call (`steering.schedule_step`), cached per call."""
    return _schedule_of(to)[1]


def stream_span(p: Position, out: dict, to: dict):
    """Where position `p` lies in a block's output: (key of `out`, first token, end token), or None
    when the block has no such stream (MMDiT's last block returns no text). The token layout (see
    TOKEN_LAYOUT) may add, after (text, image) tokens: where the image starts in a single-stream sequence
    (Z-Image: after the caption pads; HunyuanImage: after reference images), where the text starts there
    (HunyuanImage: after the image) and where the image starts in the double blocks' image stream."""
    lay = to.get(TOKEN_LAYOUT, ())
    if p.kind == "single":
        txt_len, img_len = token_layout(to, out["img"].shape[1])
        img_start = lay[2] if len(lay) > 2 else txt_len
        txt_start = lay[3] if len(lay) > 3 else 0
        return ("img", txt_start, txt_start + txt_len) if p.stream == "txt" else ("img", img_start, img_start + img_len)
    x = out.get(p.stream)
    if x is None:
        return None
    start, stop = 0, x.shape[1]
    if p.stream == "img" and lay:
        start = lay[4] if len(lay) > 4 else 0
        stop = min(stop, start + lay[1])  # reference-image tokens follow the image
    return (p.stream, start, stop)


def token_layout(to: dict, total: int) -> tuple[int, int]:
    """(text tokens, output image tokens) of a single-stream sequence of `total` tokens."""
    img_len = None
    if TOKEN_LAYOUT in to:
        txt_len, img_len = to[TOKEN_LAYOUT][:2]
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


def install(set_patch, get_patch, positions: list[Position], make) -> list:
    """Install one patch per block slot through the model patcher's own setters: `get_patch(slot)` returns
    the patch already there (or None), `set_patch(patch, slot)` sets one, `make(positions, previous)`
    builds ours (a BlockSteering or a BlockRecorder). Returns the installed patches."""
    by_slot: dict = {}
    for p in positions:
        by_slot.setdefault(p.slot, []).append(p)
    installed = []
    for slot, ps in sorted(by_slot.items()):
        patch = make(ps, get_patch(slot))
        set_patch(patch, slot)
        installed.append(patch)
    return installed
