"""SafeDIG on diffusers' DiT transformers: steer and record block outputs through forward hooks.

The core's other adapter patches ComfyUI; this one hooks a diffusers transformer (no ComfyUI needed) of FLUX.1,
Chroma, Flux.2, SD3/SD3.5, Qwen-Image, Wan 2.x, HunyuanImage 2.1, Lumina 2 / Z-Image or HiDream and applies the
same `PositionSteerer.steer` to the same dictionary files. `families.py` tells the family from the transformer's
class and maps position names onto its blocks; `tokens.py` reads each call's token layout and cuts a block's
output into the text and image streams, as ComfyUI's adapter names them:

- `double.i.*` / `single.j.*` / `joint.i.*`: the outputs of the family's double, single or joint blocks, text
  and image streams as the block returns them (a tuple, or one joined sequence split where the family puts
  each part); `input.txt` (FLUX-style families): the call's `encoder_hidden_states`.
- Reference-image tokens (FLUX.1 Kontext, Flux.2 and Qwen-Image edits), padding (Z-Image, HiDream) and the Llama
  layer HiDream's blocks append to the text are never steered, as in ComfyUI's adapter.

Sampler window: a pre-hook on the transformer reads each call's `timestep`; with `schedule` (the pipeline's
scheduler, read live, or a tensor of timesteps) the call is step i of n where i indexes the nearest schedule
entry, and progress is i/n, the unit ComfyUI's window uses. Without a schedule (and without `set_progress`)
every call is in the window, as in ComfyUI. The per-image gate's decision (`gate.py`) lives in the hooks' shared
state, made afresh by that pre-hook for every call.

Usage:
    with steer(pipe.transformer, "dict.safetensors", SteeringConfig(blend=1, repel=1), schedule=pipe.scheduler):
        image = pipe(prompt).images[0]
"""
from __future__ import annotations

import os

import torch

from ...formats.dictionary import SafetyDictionary, load
from ...gate import CallDecision, plan, steer_block
from ...positions import ModelLayout, Position, PositionError, for_layout, parse_list
from ...schedule import half_rows, in_window
from ...steering import SteeringConfig
from . import families, tokens
from .families import layout_of

HALVES = {"cond": 0, "uncond": 1}  # steering.half_rows' chunk codes


def describe(layout: ModelLayout) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in layout.blocks.items()) + f" blocks of width {layout.width}"


class Hooks:
    """The hooks of one `steer` or `record` call, and what they share about the current transformer call
    (progress, timestep, text length, the output image's tokens). A context manager: leaving it, or `close()`,
    removes every hook."""

    def __init__(self, transformer, layout: ModelLayout, schedule=None, halves=None):
        self.transformer, self.layout, self.schedule = transformer, layout, schedule
        self.halves = None if halves is None else [HALVES[h] for h in _check_halves(halves)]
        self.handles: list = []
        self.manual: float | None = None
        self.progress: float | None = None
        self.timestep: float | None = None
        self.call: tokens.Call | None = None
        self.on_input = None  # the text input's hook: txt -> txt
        self.decision = CallDecision()  # the per-image gate's decision within the current call
        self.handles.append(transformer.register_forward_pre_hook(self._before_call, with_kwargs=True))

    def set_progress(self, progress: float | None) -> None:
        """Fix the schedule progress (0..1) of the following transformer calls, for custom sampling loops;
        None returns to the schedule (or, without one, to steering every call)."""
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress={progress} must be in [0, 1]")
        self.manual = progress

    def _before_call(self, module, args, kwargs):
        call = self.call = tokens.read_call(self.layout, module, args, kwargs)
        self.timestep = call.timestep
        self.progress = self.manual if self.manual is not None else self._scheduled()
        self.decision = CallDecision()
        enc = call.arguments.arguments.get("encoder_hidden_states")
        if self.on_input is None or enc is None:
            return None
        new = self.on_input(enc)
        if new is enc:
            return None
        call.arguments.arguments["encoder_hidden_states"] = new
        return call.arguments.args, call.arguments.kwargs

    def _scheduled(self) -> float | None:
        ts = getattr(self.schedule, "timesteps", self.schedule)
        if ts is None or self.timestep is None:
            return None
        ts = torch.as_tensor(ts).detach().flatten().double().cpu()
        begin = getattr(self.schedule, "begin_index", None)
        if begin:  # img2img pipelines run the schedule from here on
            ts = ts[begin:]
        if len(ts) == 0:
            return None
        gap = (ts - self.timestep).abs()
        i = int(gap.argmin())
        span = float(ts.max() - ts.min()) or float(ts.abs().max()) or 1.0
        if float(gap[i]) > 0.01 * span:
            raise ValueError(f"timestep {self.timestep:g} (scheduler units) is not in the steering schedule "
                             f"[{float(ts.min()):g} .. {float(ts.max()):g}]: pass the scheduler that drives this "
                             "transformer, or its timesteps in 0..1000 units")
        return i / len(ts)

    def hook(self, positions: list[Position], on_streams) -> None:
        """Hook the block of `positions` (one block, or the text input): `on_streams(streams, positions)` gets
        {"txt", "img"} tensors (None where the block outputs no such stream; img: the output image's tokens)
        and returns them, replaced where it changed them."""
        if positions[0].kind == "input":
            self.on_input = lambda txt: on_streams({"txt": txt, "img": None}, positions)["txt"]
            return
        family = self.layout.family
        need = {p.stream for p in positions}

        def after(module, args, out):
            streams, rebuild = tokens.streams_of(family, self.call, out, positions[0], need)
            new = on_streams(streams, positions)
            if all(new[k] is streams[k] for k in streams):
                return None
            return rebuild(new)

        self.handles.append(families.block_of(self.transformer, family, positions[0]).register_forward_hook(after))

    def close(self) -> None:
        self.on_input = None
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_halves(halves) -> list[str]:
    halves = [halves] if isinstance(halves, str) else list(halves)
    bad = [h for h in halves if h not in HALVES]
    if bad or not halves:
        raise ValueError(f"halves={halves!r}: give the batch layout as a list of 'cond'/'uncond' chunks, "
                         "e.g. ('uncond', 'cond') for diffusers' SD3 pipeline with guidance")
    return halves


def _by_block(positions: list[Position]) -> list[list[Position]]:
    out: dict = {}
    for p in positions:
        out.setdefault((p.kind, p.index), []).append(p)
    return list(out.values())


def _install(transformer, layout, positions, on_streams, schedule, halves) -> Hooks:
    hooks = Hooks(transformer, layout, schedule, halves)
    try:
        for ps in _by_block(positions):
            hooks.hook(ps, on_streams)
    except BaseException:
        hooks.close()
        raise
    return hooks


def steer(transformer, dictionary: SafetyDictionary | str | os.PathLike, cfg: SteeringConfig | None = None,
          positions="all", schedule=None, halves=None) -> Hooks:
    """Steer `transformer` (a diffusers transformer of a family `families.py` knows) with a SafeDIG dictionary
    (object or file) until the returned `Hooks` is closed; use it as `with steer(...):`.

    cfg: steering settings (default: the dictionary's own defaults). positions: "all", a comma list or a
    list of the dictionary's positions. schedule: the pipeline's scheduler (or its timesteps) for the
    sampler window. halves: the batch layout, needed by apply_to "cond"/"uncond": diffusers' SD3 pipeline
    with guidance_scale > 1 stacks ("uncond", "cond") in one call (its skip-layer guidance adds a cond-only
    call, which this fixed layout cannot describe); FLUX-dev is guidance-distilled and has no CFG batch
    (("cond",), or leave apply_to at "both"); HiDream's pipeline stacks ("uncond", "cond") too, Z-Image's
    ("cond", "uncond"); FluxPipeline's true_cfg_scale and the Chroma, Qwen-Image, Wan, HunyuanImage and Lumina 2
    pipelines run the negative prompt as a call of its own, so a layout per call would be needed there."""
    source = "dictionary"
    if not isinstance(dictionary, SafetyDictionary):
        source = f"safety dictionary {os.fspath(dictionary)}"
        dictionary = load(os.fspath(dictionary))
    cfg = cfg or dictionary.default_config()
    layout = layout_of(transformer)
    spec = positions if isinstance(positions, str) else ",".join(str(p) for p in positions)
    chosen = parse_list(spec, dictionary.positions)
    gate = plan(cfg, chosen, dictionary.positions)
    dictionary.check_layout(layout, gate.positions, source=source)
    if cfg.apply_to != "both" and halves is None:
        raise ValueError(f"apply_to={cfg.apply_to!r} needs the batch layout: pass halves=('uncond', 'cond') "
                         "for a pipeline that stacks the negative prompt first (diffusers' SD3 with guidance)")
    steerers = {p: dictionary.entries[p].steerer() for p in gate.positions}
    hooks: Hooks

    def on_streams(streams: dict, ps: list[Position]) -> dict:
        if cfg.is_identity or not in_window(hooks.progress, cfg):
            return streams
        parts = {p: streams[p.stream] for p in ps if streams[p.stream] is not None and streams[p.stream].shape[1]}
        steered = steer_block(parts, steerers, cfg, gate, hooks.decision,
                              lambda x: half_rows(x.shape[0], hooks.halves, cfg.apply_to), hooks.halves)
        streams = dict(streams)
        for p, y in steered.items():
            streams[p.stream] = y
        return streams

    hooks = _install(transformer, layout, gate.positions, on_streams, schedule, halves)
    return hooks


def record(transformer, positions, callback, schedule=None) -> Hooks:
    """Hand the block outputs at `positions` ("all", a comma list or a list; checked against the model) to
    `callback(position, x, info)` on every transformer call, until the returned `Hooks` is closed; x is
    the stream [B, tokens, d] as the model computed it (copy it to keep it), info has the call's
    "progress" (None without a schedule) and "timestep" (scheduler units, 0..1000)."""
    layout = layout_of(transformer)
    chosen = _model_positions(positions, layout)
    hooks: Hooks

    def on_streams(streams: dict, ps: list[Position]) -> dict:
        info = {"progress": hooks.progress, "timestep": hooks.timestep}
        for p in ps:
            if streams[p.stream] is not None:
                callback(p, streams[p.stream], info)
        return streams

    hooks = _install(transformer, layout, chosen, on_streams, schedule, None)
    return hooks


def _model_positions(spec, layout: ModelLayout) -> list[Position]:
    try:
        return for_layout(spec, layout)
    except PositionError as e:
        raise PositionError(f"{e} (this transformer has {describe(layout)})") from None
