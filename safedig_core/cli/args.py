"""argparse types for every `safedig` flag: a bad value is refused where argparse reads it, before any
work, in one line that says what the flag takes (ranges, finiteness, known samplers, schedulers and devices,
output paths that can be written). Values are shortened when quoted (`formats.messages`), so a megabyte
argument gives a readable line."""
from __future__ import annotations

import argparse
import math
import os

from ..formats.messages import quoted, shorten

MESSAGE_LIMIT = 300  # characters of an error line; longer ones are cut in the middle


class Parser(argparse.ArgumentParser):
    """argparse with its own error lines shortened (it quotes the offending value in full)."""

    def error(self, message):  # one line, no usage block: `-h` shows the usage
        self.exit(2, f"{self.prog}: error: {shorten(message, MESSAGE_LIMIT)} (see {self.prog} -h)\n")


def _bad(text: str):
    raise argparse.ArgumentTypeError(text)


def _range(lo, hi) -> str:
    if hi is None:
        return f"≥ {lo:g}" if isinstance(lo, float) else f"≥ {lo}"
    return f"in [{lo:g}, {hi:g}]" if isinstance(lo, float) or isinstance(hi, float) else f"in {lo}..{hi}"


def integer(lo: int, hi: int | None = None):
    """An integer in lo..hi (hi None: no upper bound)."""
    def parse(text: str) -> int:
        digits = text.strip().replace("_", "")
        if digits.lstrip("+-").isdigit() and len(digits) > 30:  # also past int()'s digit limit
            _bad(f"{quoted(text)} is out of range (expected an integer {_range(lo, hi)})")
        try:
            v = int(digits)
        except ValueError:
            _bad(f"{quoted(text)} is not an integer (expected one {_range(lo, hi)})")
        if v < lo or (hi is not None and v > hi):
            _bad(f"{v} is out of range (expected an integer {_range(lo, hi)})")
        return v
    parse.__name__ = "integer"
    return parse


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite number in [lo, hi] (or (lo, hi] with lo_open); None: unbounded on that side."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            _bad(f"{quoted(text)} is not a number")
        want = ("a finite number" + (f" {'>' if lo_open else '≥'} {lo:g}" if lo is not None else "")
                + (f" and ≤ {hi:g}" if hi is not None and lo is not None else (f" ≤ {hi:g}" if hi is not None else "")))
        if not math.isfinite(v):
            _bad(f"{text.strip()} is not allowed (expected {want})")
        if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
            _bad(f"{v:g} is out of range (expected {want})")
        return v
    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """cpu, cuda, cuda:N or mps, and present on this machine."""
    import torch

    name = text.strip().lower()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        _bad(f"{quoted(text)} is not a device (expected cpu, cuda, cuda:N or mps)")
    if dev.type == "cpu":
        return name
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            _bad(f"{name}: this machine has no usable CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            _bad(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
        return name
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            _bad(f"{name}: MPS is not available on this machine (use --device cpu)")
        return name
    _bad(f"{quoted(text)}: unsupported device type {dev.type} (expected cpu, cuda, cuda:N or mps)")


def _known(kind: str):
    def parse(text: str) -> str:
        from ..adapters.comfy.runner import ksampler_names

        names = ksampler_names(kind)
        if text not in names:
            _bad(f"unknown {kind} {quoted(text)} (ComfyUI's are: {shorten(', '.join(names), 200)})")
        return text
    parse.__name__ = kind
    return parse


sampler = _known("sampler")
scheduler = _known("scheduler")


def _writable_parent(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # created later: the nearest existing folder must take new entries
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        _bad(f"{quoted(path)}: {quoted(folder)} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        _bad(f"{quoted(path)}: cannot write in {quoted(folder)}")


def output_file(text: str) -> str:
    """A file to write: not a folder, in a folder that exists or can be made and that can be written."""
    if not text.strip():
        _bad("an empty file name")
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        _bad(f"{quoted(text)} is a folder; give a file name")
    if os.path.exists(text) and not os.access(text, os.W_OK):
        _bad(f"{quoted(text)} exists and cannot be written")
    _writable_parent(text)
    return text


def output_dir(text: str) -> str:
    """A folder to write into: not a file, and it or its nearest existing parent can be written."""
    if not text.strip():
        _bad("an empty folder name")
    if os.path.exists(text) and not os.path.isdir(text):
        _bad(f"{quoted(text)} is a file; give a folder")
    if os.path.isdir(text):
        if not os.access(text, os.W_OK | os.X_OK):
            _bad(f"cannot write in {quoted(text)}")
    else:
        _writable_parent(text)
    return text


def numbers(count: int, lo: float = 0.0):
    """`count` comma-separated finite numbers ≥ lo, e.g. the routing weights T,S,A."""
    one = number(lo)

    def parse(text: str) -> list[float]:
        parts = [p for p in text.split(",") if p.strip()]
        if len(parts) != count:
            _bad(f"{quoted(text)}: expected {count} comma-separated numbers")
        return [one(p) for p in parts]
    parse.__name__ = "numbers"
    return parse


SEED = integer(0, 2 ** 63 - 1)
STEPS = integer(1, 10 ** 8)
BATCH = integer(1, 1 << 20)
LR = number(0.0, 1.0, lo_open=True)
EXPANSION = integer(1, 256)
