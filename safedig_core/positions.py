"""Intervention positions: the one place that knows position names, their functional groups,
which block slot serves them, and whether a model has them.

A position is the output of one DiT block for one token stream, named by a stable string:
FLUX-style `double.{i}.img|txt`, `single.{j}.img|txt`; SD3 MMDiT `joint.{i}.img|txt`; or `input.txt`, the
DiT's text input: the conditioning tokens as the DiT receives them, before its first block and its own text
projection (FLUX.1: the T5 states, `context_in_dim` wide, 4096 on FLUX.1; Flux.2's left-padded to 512).
It exists in the families marked `txt_input`; it runs before every block (`call_order`), counts as depth 0
and block -1 (before block 0), and its width is the layout's `input_width`. `input.pooled` is the pooled text
vector as the DiT receives it (FLUX.1's CLIP vector `y`, `vec_in_dim` wide, 768 on FLUX.1), which the DiT turns
into every block's modulation: one token per image, in the text stream, run after `input.txt` and before every
block, in the families marked `pooled_input` whose layout has a `pooled_width` (not SD3: ComfyUI 0.3.75's MMDiT
forward has no DIFFUSION_MODEL wrapper to serve it).

A family is a block layout the hooks know, told apart by the model's own class (adapters/comfy/families.py),
never by its attribute names: Chroma and Flux.2 have FLUX.1's double/single blocks, but their weights, widths
and text streams are their own, so a dictionary of one is refused on another.

| family | model                 | blocks (stack order)       | single-block sequence        | text of the last block  |
| ------ | --------------------- | -------------------------- | ---------------------------- | ----------------------- |
| flux   | FLUX.1 dev / schnell / Kontext | double 19, single 38 (3072) | [txt | img | reference img] | dropped (no position)   |
| chroma | Chroma                | double 19, single 38 (3072) | [txt | img]                  | dropped (no position)   |
| flux2  | Flux.2                | double, single             | [txt (left-padded to 512) | img | reference img] | dropped |
| sd3    | SD3 / SD3.5 (MMDiT)   | joint                      | (none)                       | context-pre-only: none  |
| qwen_image | Qwen-Image        | double (60 blocks, 3072)   | (none; joint attention, text first) | unused (no position) |
| wan    | Wan 2.1 / 2.2 text-to-video | double (the blocks; img only, 5120 at 14B) | (none; text by cross-attention) | no text stream |
| hunyuan_image | HunyuanImage 2.1     | double, single             | [img | txt (+ byT5)], image first | dropped |
| hidream | HiDream-I1          | double, single             | [img | T5 | Llama (+ the block's own Llama layer, never steered)] | dropped |
| lumina2 | Lumina 2 / Z-Image (NextDiT) | single (the main layers; 2304 / 3840) | [caption (+ Z-Image pad) | img (+ pad)] | dropped |

Reference-image tokens (Kontext, Flux.2 and Qwen-Image edits) follow the output image and are never steered.
Blocks are served by ComfyUI's `patches_replace["dit"]` slots (`double_block` for double and joint blocks,
`single_block` for single ones) where the family's forward has them; NextDiT and HiDream have none, and their
blocks are given the same protocol on a clone (adapters/comfy/shim.py). Lumina 2's refiner layers (caption and noise
refiners, before the joint layers) are not positions. Z-Image pads caption and image to multiples of 32 tokens:
the pads are neither text nor image positions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    label: str  # the name users know
    kinds: tuple  # block kinds in stack order
    last_txt_dead: bool = True  # the text output of the last block is never used again (no position there)
    streams: tuple = ("img", "txt")  # the streams a block returns
    txt_input: bool = False  # the DiT's text input (`input.txt`) is a position
    pooled_input: bool = False  # the DiT's pooled text vector (`input.pooled`) is a position


FAMILY_INFO = {
    "flux": Family("FLUX.1", ("double", "single"), txt_input=True, pooled_input=True),
    "chroma": Family("Chroma", ("double", "single"), txt_input=True),
    "flux2": Family("Flux.2", ("double", "single"), txt_input=True),
    "sd3": Family("SD3/SD3.5", ("joint",), last_txt_dead=False),  # its last block computes no text at all
    "qwen_image": Family("Qwen-Image", ("double",)),
    "wan": Family("Wan 2.x", ("double",), streams=("img",)),  # text enters by cross-attention, never updated
    "hunyuan_image": Family("HunyuanImage 2.1", ("double", "single")),
    "hidream": Family("HiDream", ("double", "single")),  # shimmed; text = [T5 | last Llama layer]
    "lumina2": Family("Lumina 2 / Z-Image", ("single",)),  # NextDiT: one joint sequence, caption first
}
FAMILIES = {name: f.kinds for name, f in FAMILY_INFO.items()}
STREAMS = ("img", "txt")
GROUPS = ("text_binding", "visual_binding", "rendering")

_NAME = re.compile(r"^(double|single|joint)\.(\d+)\.(img|txt)$", re.ASCII)
INPUT = "input.txt"
POOLED = "input.pooled"
INPUT_KINDS = ("input", "pooled")  # the DiT's inputs, served before its blocks by a DIFFUSION_MODEL wrapper


class PositionError(ValueError):
    """A position name that is malformed, of the wrong family, or absent from the model."""


@dataclass(frozen=True, order=True)
class Position:
    kind: str  # "double", "single", "joint", "input" (text tokens) or "pooled" (the pooled text vector)
    index: int
    stream: str  # "img" or "txt"

    @property
    def name(self) -> str:
        if self.kind in INPUT_KINDS:
            return INPUT if self.kind == "input" else POOLED
        return f"{self.kind}.{self.index}.{self.stream}"

    @property
    def family(self) -> str:
        """The first family with blocks of this kind (FLUX.1 for double/single); see `belongs`."""
        return "sd3" if self.kind == "joint" else "flux"

    def belongs(self, family: str) -> bool:
        """Whether models of `family` have blocks of this position's kind (or a text input position)."""
        if self.kind == "input":
            return family in FAMILY_INFO and FAMILY_INFO[family].txt_input
        if self.kind == "pooled":
            return family in FAMILY_INFO and FAMILY_INFO[family].pooled_input
        return self.kind in FAMILIES.get(family, ())

    @property
    def call_order(self) -> tuple[int, int]:
        """Where this position's block runs within one model call: FLUX's double blocks, then its single
        blocks; SD3's joint blocks in order. Both streams of a block share it; the text input, then the pooled
        vector, precede all."""
        if self.kind in INPUT_KINDS:
            return (-1, INPUT_KINDS.index(self.kind))
        return (FAMILIES[self.family].index(self.kind), self.index)

    @property
    def slot(self) -> tuple[str, int]:
        """The (block_name, index) key of ComfyUI's `patches_replace["dit"]` that serves this position.
        MMDiT joint blocks are registered as "double_block" by ComfyUI; the inputs have SafeDIG's own slots."""
        if self.kind in INPUT_KINDS:
            return (self.kind, 0)
        return ("single_block" if self.kind == "single" else "double_block", self.index)

    def __str__(self) -> str:
        return self.name


def parse(name: str) -> Position:
    if name.strip() == INPUT:
        return Position("input", 0, "txt")
    if name.strip() == POOLED:
        return Position("pooled", 0, "txt")
    m = _NAME.match(name.strip())
    if not m:
        raise PositionError(
            f"bad position name {name!r}: expected double.<i>.img|txt or single.<j>.img|txt (FLUX.1, Chroma, "
            "Flux.2), joint.<i>.img|txt (SD3), input.txt (the DiT's text input) or input.pooled (its pooled text vector)")
    return Position(m.group(1), int(m.group(2)), m.group(3))


@dataclass(frozen=True)
class ModelLayout:
    """Block counts and widths of one DiT, as the hooks see it."""
    family: str
    blocks: dict  # kind -> number of blocks
    width: int
    txt_width: int | None = None  # width of the text stream, when it differs (it never does in FLUX/SD3)
    last_txt_absent: bool = False  # SD3: the last joint block is context-pre-only and outputs no text
    variant: str | None = None  # the exact model config (ComfyUI's supported_models class), e.g. Flux, FluxSchnell
    input_width: int | None = None  # width of `input.txt` (FLUX: context_in_dim); None: not a position here
    pooled_width: int | None = None  # width of `input.pooled` (FLUX: vec_in_dim); None: not a position here

    @property
    def label(self) -> str:
        """FAMILY (variant), as messages name a model."""
        return f"{self.family.upper()} ({self.variant})" if self.variant else self.family.upper()

    def positions(self) -> list[Position]:
        out = [p for p in (Position("input", 0, "txt"), Position("pooled", 0, "txt")) if self.has(p)]
        for kind in FAMILIES[self.family]:
            for i in range(self.blocks.get(kind, 0)):
                for stream in FAMILY_INFO[self.family].streams:
                    p = Position(kind, i, stream)
                    if self.has(p):
                        out.append(p)
        return out

    def has(self, p: Position) -> bool:
        if p.kind in INPUT_KINDS:
            return p.belongs(self.family) and self.width_of(p) is not None
        if not p.belongs(self.family) or not 0 <= p.index < self.blocks.get(p.kind, 0):
            return False
        if p.stream not in FAMILY_INFO[self.family].streams:
            return False
        return not self._dead_text(p)

    def _dead_text(self, p: Position) -> bool:
        """The text stream of the model's last block: SD3's is never computed (context pre-only) and the
        single-stream families drop the text tokens after their last single block, so steering there could
        change nothing."""
        fam = FAMILY_INFO[self.family]
        last = fam.kinds[-1]
        if p.stream != "txt" or p.kind != last or p.index != self.blocks.get(last, 0) - 1:
            return False
        return fam.last_txt_dead or self.last_txt_absent

    def width_of(self, p: Position) -> int:
        if p.kind in INPUT_KINDS:
            return self.input_width if p.kind == "input" else self.pooled_width
        return self.txt_width if (p.stream == "txt" and self.txt_width) else self.width

    def check(self, p: Position) -> None:
        if p.kind in INPUT_KINDS:
            if not self.has(p):
                what = "text input" if p.kind == "input" else "pooled text vector"
                if p.belongs(self.family):  # the family has it, this runtime does not serve it
                    raise PositionError(f"position {p}: this runtime does not hook the {what} of {self.label} models "
                                        "(ComfyUI does): steer it in ComfyUI, or leave it out of the positions")
                raise PositionError(f"position {p}: SafeDIG does not hook the {what} of {self.label} models")
            return
        if not p.belongs(self.family):
            raise PositionError(f"position {p} belongs to {p.family.upper()}, but the model is {self.label}")
        n = self.blocks.get(p.kind, 0)
        if not 0 <= p.index < n:
            raise PositionError(f"position {p}: the model has {n} {p.kind} blocks (indices 0..{n - 1})")
        if p.stream not in FAMILY_INFO[self.family].streams:
            raise PositionError(f"position {p}: {self.family.upper()} blocks return no {p.stream} stream")
        if not self.has(p):
            if p.kind == "joint":
                raise PositionError(f"position {p}: the last joint block outputs no text stream (context pre-only)")
            raise PositionError(f"position {p}: {self.family.upper()} discards the text tokens of its last "
                                f"{p.kind} block, so steering there has no effect; use an earlier block or the img stream")


STREAM_WORDS = {"txt": "txt", "text": "txt", "img": "img", "image": "img"}  # `parse_list`'s one-stream shortcuts


def parse_list(spec, available: list[Position], holder: str = "the dictionary") -> list[Position]:
    """`all`, one stream (`txt` / `text`: every text-stream position, the pooled text vector included; `img` /
    `image`), a comma list of names or a list of names/Positions; every one must be among `available` (the
    positions of `holder`, e.g. a dictionary or a store); duplicates and blank names dropped."""
    if isinstance(spec, str):
        word = spec.strip().lower()
        if word in ("", "all"):
            return list(available)
        if word in STREAM_WORDS:
            chosen = [p for p in available if p.stream == STREAM_WORDS[word]]
            if not chosen:
                names = ", ".join(str(a) for a in available) or "none"
                raise PositionError(f"positions {spec.strip()!r}: {holder} has no {STREAM_WORDS[word]} stream "
                                    f"position (it has: {names})")
            return chosen
        spec = spec.split(",")
    chosen = []
    for part in spec:
        if isinstance(part, str) and not part.strip():
            continue
        p = part if isinstance(part, Position) else parse(part)
        if p not in available:
            names = ", ".join(str(a) for a in available) or "none"
            raise PositionError(f"position {p} was asked for but is not in {holder} (it has: {names})")
        if p not in chosen:
            chosen.append(p)
    return chosen


def for_layout(spec, layout: ModelLayout) -> list[Position]:
    """`all`, a comma list of names, or a list of names/Positions; each checked against the model layout
    (`PositionError` naming the position and the model's blocks); duplicates and blank names dropped."""
    if isinstance(spec, str):
        if spec.strip().lower() in ("", "all"):
            return layout.positions()
        spec = spec.split(",")
    chosen = []
    for item in spec:
        if isinstance(item, str) and not item.strip():
            continue
        p = item if isinstance(item, Position) else parse(str(item))
        layout.check(p)
        if p not in chosen:
            chosen.append(p)
    return chosen


def group(p: Position, layout: ModelLayout | None = None) -> str:
    """Functional group: text streams bind text; double/early-middle joint image streams bind visual
    content; single blocks and the last third of joint blocks render."""
    if p.stream == "txt":
        return "text_binding"
    if p.kind == "single":
        return "rendering"
    if p.kind == "joint" and layout is not None and p.index >= (2 * layout.blocks["joint"]) // 3:
        return "rendering"
    return "visual_binding"


def block_number(p: Position, layout: ModelLayout) -> int:
    """The block's place in the whole stack, from 0 (FLUX single blocks follow the double ones); the text
    inputs, before block 0, are -1."""
    if p.kind in INPUT_KINDS:
        return -1
    order = FAMILIES[layout.family]
    return sum(layout.blocks.get(k, 0) for k in order[: order.index(p.kind)]) + p.index


def depth(p: Position, layout: ModelLayout) -> float:
    """Relative depth in [0, 1] across the whole stack (the inputs: 0)."""
    if p.kind in INPUT_KINDS:
        return 0.0
    total = sum(layout.blocks.get(k, 0) for k in FAMILIES[layout.family])
    return block_number(p, layout) / max(total - 1, 1)
