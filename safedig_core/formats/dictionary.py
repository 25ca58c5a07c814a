"""The safety dictionary file: one `.safetensors` holding one SAE per position plus JSON metadata.

Layout (format version 1):
- tensors `<position>.W_enc [L, d]`, `<position>.b_enc [L]`, `<position>.W_dec [L, d]`,
  `<position>.b_dec [d]`, and `<position>.threshold [L]` for JumpReLU; float32, float16 or bfloat16;
- header metadata key `safedig`: JSON with `format_version`, `family`, `positions` (per position:
  width, latents, k, activation, scale, harmful = [[latent, score], ...], optional safe_values,
  gate_scale (the unit of the steering threshold τ, default 1), optional image_gate_scale (the unit of τ
  under the per-image gate; absent: gate_scale), metrics, and normalize (per-token input normalisation of
  converted SAEs, default "none"), optional safe_targets (the count N of the tensor `<position>.safe_targets
  [N, d]`: activations of safe prompts that Blend moves to, see steering.py)), `steering_defaults` and
  `provenance`.
Loading reads only the safetensors header and tensors: nothing is ever unpickled. Every problem is a
`DictionaryError` whose message names the file and what is wrong. A file is treated as hostile until checked:
the header and its metadata are bounded in size and nesting before they are parsed, every declared size is
checked against the tensors' own shapes and an upper bound before anything is allocated, and values that
cannot give finite steering (a non-positive, tiny or huge `scale`, huge weights or safe values) are refused
with the file, the position and the key.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..positions import FAMILIES, ModelLayout, Position, PositionError, parse
from ..sae import ACTIVATIONS, NORMALIZATIONS, SparseAutoencoder
from ..steering import PositionSteerer, SteeringConfig
from .atomic import replacing
from .messages import quoted

FORMAT_VERSION = 1
META_KEY = "safedig"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ST_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_OTHER = {"F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool}

# Bounds of what a dictionary may declare, checked before anything is allocated or parsed.
MAX_HEADER_BYTES = 64 << 20  # the safetensors JSON header (tensor table + metadata)
MAX_METADATA_BYTES = 16 << 20  # the 'safedig' metadata string
MAX_NESTING = 32  # JSON depth of the metadata
MAX_WIDTH = 1 << 16  # activation width d
MAX_LATENTS = 1 << 22  # latents L per position
MAX_TARGETS = 1 << 20  # safe exemplars N per position
MAX_MATRIX = 1 << 30  # L·d elements of one matrix (4 GiB in float32)
# Values that still give finite steering in float32 (and bfloat16): trained SAEs have O(1) weights, scales
# of about 1/‖x‖·√d and safe values of the order of their latents' activations.
MAX_ABS_VALUE = 1e5  # any weight, bias, threshold or safe value
SCALE_RANGE = (1e-6, 1e6)
GATE_RANGE = (1e-12, 1e12)


class DictionaryError(ValueError):
    """A safety dictionary file that cannot be used, or that does not fit the model."""


@dataclass
class DictionaryEntry:
    position: Position
    sae: SparseAutoencoder
    harmful: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    safe_values: list[float] | None = None
    metrics: dict = field(default_factory=dict)
    gate_scale: float = 1.0  # unit of the steering threshold τ (harmful mass); see steering.py
    image_gate_scale: float | None = None  # unit of τ for the per-image gate (None: gate_scale); see gate.py
    safe_targets: torch.Tensor | None = None  # [N, d] safe exemplars Blend moves to (None: the safe reconstruction)

    def steerer(self) -> PositionSteerer:
        safe = None if self.safe_values is None else torch.tensor(self.safe_values, dtype=torch.float32)
        return PositionSteerer(self.sae, torch.tensor(self.harmful, dtype=torch.long), safe, self.gate_scale,
                               self.image_gate_scale, self.safe_targets)


@dataclass
class SafetyDictionary:
    family: str
    entries: dict[Position, DictionaryEntry]
    steering_defaults: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    variant: str | None = None  # the exact model config it was made on (ModelLayout.variant); None: any of the family

    @property
    def positions(self) -> list[Position]:
        return sorted(self.entries)

    def default_config(self) -> SteeringConfig:
        known = SteeringConfig.__dataclass_fields__
        return SteeringConfig(**{k: v for k, v in self.steering_defaults.items() if k in known})

    def check_layout(self, layout: ModelLayout, positions: list[Position] | None = None, source: str = "dictionary"):
        """Reject a dictionary that names blocks the model lacks or whose widths differ from it."""
        made = ModelLayout(self.family, {}, 0, variant=self.variant).label
        if layout.family != self.family or (self.variant and layout.variant and layout.variant != self.variant):
            raise DictionaryError(f"{source}: made for {made}, but the model is {layout.label}")
        for p in positions or self.positions:
            try:
                layout.check(p)
            except PositionError as e:
                raise DictionaryError(f"{source}: {e}") from None
            want, have = layout.width_of(p), self.entries[p].sae.d
            if want != have:
                raise DictionaryError(f"{source}: position {p} has width {have} in the dictionary but {want} in the model")


def _metadata(d: SafetyDictionary) -> dict:
    positions = {}
    for p, e in sorted(d.entries.items()):
        s = e.sae
        meta = {"width": s.d, "latents": s.latents, "k": s.k, "activation": s.activation,
                "scale": float(s.scale), "harmful": [[int(j), float(v)] for j, v in zip(e.harmful, e.scores)]}
        if e.safe_values is not None:
            meta["safe_values"] = [float(v) for v in e.safe_values]
        if e.gate_scale != 1.0:
            meta["gate_scale"] = float(e.gate_scale)
        if e.image_gate_scale is not None:
            meta["image_gate_scale"] = float(e.image_gate_scale)
        if s.normalize != "none":
            meta["normalize"] = s.normalize
        if e.safe_targets is not None:
            meta["safe_targets"] = int(e.safe_targets.shape[0])
        if e.metrics:
            meta["metrics"] = e.metrics
        positions[p.name] = meta
    return {"format_version": FORMAT_VERSION, "family": d.family, "positions": positions,
            "steering_defaults": d.steering_defaults, "provenance": d.provenance,
            **({"variant": d.variant} if d.variant else {})}


def save(d: SafetyDictionary, path: str, dtype: torch.dtype = torch.float32) -> None:
    """Write atomically: a crash mid-write never leaves a truncated file under `path`."""
    tensors = {}
    for p, e in d.entries.items():
        if len(e.harmful) != len(e.scores):
            raise DictionaryError(f"{path}: position {p} has {len(e.harmful)} harmful latents but {len(e.scores)} scores")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if e.sae.activation == "jumprelu" else ()):
            tensors[f"{p}.{name}"] = getattr(e.sae, name).detach().to("cpu", dtype).contiguous()
        if e.safe_targets is not None:
            if e.safe_targets.dim() != 2 or e.safe_targets.shape[1] != e.sae.d:
                raise DictionaryError(f"{path}: position {p} has safe targets of shape {list(e.safe_targets.shape)}, "
                                      f"expected [count, {e.sae.d}]")
            tensors[f"{p}.safe_targets"] = e.safe_targets.detach().to("cpu", dtype).contiguous()
    with replacing(path) as tmp:
        mode = os.stat(tmp).st_mode & 0o777  # the umask's: save_file would leave its own 0600
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(_metadata(d))})
        os.chmod(tmp, mode)


def _fail(path, msg):
    raise DictionaryError(f"{path}: {msg}")


def _nesting(text: str) -> int:
    """The deepest nesting of JSON arrays/objects in `text`, counted without parsing it (strings ignored)."""
    brackets = re.sub(r'[^\[\]{}]', "", re.sub(r'"(?:[^"\\]|\\.)*"', "", text))
    depth = deepest = 0
    for c in brackets:
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _header_size(path: str) -> int:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        _fail(path, f"cannot be read ({e.strerror})")
    if len(head) < 8:
        _fail(path, "not a safetensors file (shorter than its 8-byte header length)")
    n = struct.unpack("<Q", head)[0]
    if n > MAX_HEADER_BYTES or n > size - 8:
        _fail(path, f"not a safetensors file (its header claims {n} bytes in a file of {size})")
    return n


def read_metadata(path: str) -> dict:
    if not os.path.isfile(path):
        _fail(path, "no such file")
    _header_size(path)
    try:
        with safe_open(path, "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for any malformed header
        _fail(path, f"not a safetensors file ({quoted(str(e).splitlines()[0]) if str(e) else type(e).__name__})")
    if raw is None:
        _fail(path, f"a safetensors file, but not a SafeDIG dictionary (no '{META_KEY}' metadata)")
    if len(raw) > MAX_METADATA_BYTES:
        _fail(path, f"'{META_KEY}' metadata of {len(raw)} bytes is over the limit of {MAX_METADATA_BYTES}")
    depth = _nesting(raw)
    if depth > MAX_NESTING:
        _fail(path, f"'{META_KEY}' metadata is nested {depth} levels deep (at most {MAX_NESTING})")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        _fail(path, f"'{META_KEY}' metadata is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})")
    if not isinstance(meta, dict):
        _fail(path, f"'{META_KEY}' metadata must be a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        _fail(path, f"unknown format version {quoted(version)} (this SafeDIG reads version {FORMAT_VERSION}; "
                    "upgrade SafeDIG or re-export the dictionary)")
    if not isinstance(meta.get("family"), str) or meta["family"] not in FAMILIES:
        _fail(path, f"unknown model family {quoted(meta.get('family'))} (expected one of {', '.join(FAMILIES)})")
    if not isinstance(meta.get("positions"), dict) or not meta["positions"]:
        _fail(path, "the dictionary names no positions")
    meta["_keys"] = keys
    return meta


def _check_slice(f, path, key, shape):
    """Dtype and shape of a tensor from the header alone (nothing read or allocated)."""
    if key not in f.keys():  # noqa: SIM118 - safe_open is not a dict
        _fail(path, f"missing tensor '{key}'")
    sl = f.get_slice(key)
    dtype = sl.get_dtype()
    if dtype not in _ST_FLOAT:
        _fail(path, f"tensor '{key}' has dtype {_ST_OTHER.get(dtype, dtype)}, expected float32, float16 or bfloat16")
    if tuple(sl.get_shape()) != tuple(shape):
        _fail(path, f"tensor '{key}' has shape {list(sl.get_shape())}, expected {list(shape)}")


def _tensor(f, path, key):
    t = f.get_tensor(key)
    if not torch.isfinite(t).all():
        _fail(path, f"tensor '{key}' contains NaN or Inf")
    big = float(t.abs().max()) if t.numel() else 0.0
    if big > MAX_ABS_VALUE:
        _fail(path, f"tensor '{key}' has a value of magnitude {big:.3g}, over {MAX_ABS_VALUE:g}: it cannot give "
                    "finite steering")
    return t


def _number(pm, key, what, path, pos, default, lo, hi):
    v = pm.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
        _fail(path, f"position {pos}: {what} must be a positive number in [{lo:g}, {hi:g}] (key '{key}'), "
                    f"got {quoted(v)}")
    return float(v)


def _int(meta, key, path, pos, lo=1, hi=MAX_LATENTS):
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        _fail(path, f"position {pos}: '{key}' must be an integer in {lo}..{hi}, got {quoted(v)}")
    return v


def _unit(meta, key, default, path, pos):
    v = meta.get(key, default)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        _fail(path, f"position {pos}: '{key}' must be a positive number, got {v!r}")
    return float(v)


def load(path: str) -> SafetyDictionary:
    meta = read_metadata(path)
    family = meta["family"]
    entries = {}
    with safe_open(path, "pt") as f:
        for name, pm in meta["positions"].items():
            try:
                p = parse(name)
            except PositionError as e:
                _fail(path, str(e))
            if not p.belongs(family):
                _fail(path, f"position {p} is not a {family.upper()} position")
            if not isinstance(pm, dict):
                _fail(path, f"position {p}: metadata must be an object")
            d, L = _int(pm, "width", path, p, hi=MAX_WIDTH), _int(pm, "latents", path, p)
            if d * L > MAX_MATRIX:
                _fail(path, f"position {p}: {L} latents × width {d} is over the limit of {MAX_MATRIX} weights per matrix")
            act = pm.get("activation", "topk")
            if not isinstance(act, str) or act not in ACTIVATIONS:
                _fail(path, f"position {p}: unknown activation {quoted(act)} (expected one of {', '.join(ACTIVATIONS)})")
            k = _int(pm, "k", path, p) if act == "topk" or pm.get("k") is not None else 1
            if act == "topk" and k > L:
                _fail(path, f"position {p}: k={k} exceeds the {L} latents")
            scale = _number(pm, "scale", "activation scale", path, p, 1.0, *SCALE_RANGE)
            norm = pm.get("normalize", "none")
            if not isinstance(norm, str) or norm not in NORMALIZATIONS:
                _fail(path, f"position {p}: unknown input normalisation {quoted(norm)} "
                            f"(expected one of {', '.join(NORMALIZATIONS)})")
            shapes = {"W_enc": (L, d), "b_enc": (L,), "W_dec": (L, d), "b_dec": (d,)}
            if act == "jumprelu":
                shapes["threshold"] = (L,)
            for n, shape in shapes.items():  # every declared size against the file before any allocation
                _check_slice(f, path, f"{p}.{n}", shape)
            state = {n: _tensor(f, path, f"{p}.{n}") for n in shapes}
            sae = SparseAutoencoder(d, L, k, act, scale, norm)
            dtype = state["W_enc"].dtype
            with torch.no_grad():
                for n, t in state.items():
                    getattr(sae, n).data = t.to(dtype)
                sae.scale.data = sae.scale.to(dtype)
                if act != "jumprelu":
                    sae.threshold.data = sae.threshold.to(dtype)
            harmful = pm.get("harmful", [])
            try:
                if not isinstance(harmful, list) or any(isinstance(j, bool) or not isinstance(j, int) for j, _ in harmful):
                    raise TypeError("latents are integers")
                idx = [int(j) for j, _ in harmful]
                scores = [float(s) for _, s in harmful]
                if any(isinstance(s, (bool, str)) or not math.isfinite(float(s)) for _, s in harmful):
                    raise ValueError("scores are finite numbers")
            except (TypeError, ValueError):
                _fail(path, f"position {p}: 'harmful' must be a list of [latent, score] pairs")
            bad = [j for j in idx if not 0 <= j < L]
            if bad:
                _fail(path, f"position {p}: harmful latent {bad[0]} is out of range 0..{L - 1}")
            if len(set(idx)) != len(idx):
                _fail(path, f"position {p}: harmful latents are listed more than once")
            safe = pm.get("safe_values")
            if safe is not None and (not isinstance(safe, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and abs(v) <= MAX_ABS_VALUE for v in safe)):
                _fail(path, f"position {p}: 'safe_values' must be a list of finite numbers of magnitude at most "
                            f"{MAX_ABS_VALUE:g}")
            if safe is not None and len(safe) != len(idx):
                _fail(path, f"position {p}: {len(safe)} safe values for {len(idx)} harmful latents")
            metrics = pm.get("metrics", {})
            if not isinstance(metrics, dict):
                _fail(path, f"position {p}: 'metrics' must be a JSON object")
            gate = _number(pm, "gate_scale", "gate unit", path, p, 1.0, *GATE_RANGE)
            image_gate = _unit(pm, "image_gate_scale", None, path, p)
            targets = None
            if pm.get("safe_targets") is not None:
                n = _int(pm, "safe_targets", path, p, hi=MAX_TARGETS)
                if n * d > MAX_MATRIX:
                    _fail(path, f"position {p}: {n} safe targets × width {d} is over the limit of {MAX_MATRIX} values")
                _check_slice(f, path, f"{p}.safe_targets", (n, d))
                targets = _tensor(f, path, f"{p}.safe_targets").float()
            entries[p] = DictionaryEntry(p, sae, idx, scores, safe, metrics, gate, image_gate, targets)
    known = {f"{p}.{n}" for p, e in entries.items()
             for n in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if e.sae.activation == "jumprelu" else ())
             + (("safe_targets",) if e.safe_targets is not None else ())}
    extra = sorted(meta["_keys"] - known)
    if extra:
        stray = next((p for p in entries if extra[0] == f"{p}.threshold"), None)
        if stray is not None:
            _fail(path, f"tensor '{extra[0]}' is a JumpReLU threshold, but position {stray} has activation "
                        f"{entries[stray].sae.activation}")
        _fail(path, f"tensor '{extra[0]}' belongs to no position named in the metadata")
    extras = {key: meta.get(key) or {} for key in ("steering_defaults", "provenance")}
    for key, value in extras.items():
        if not isinstance(value, dict):
            _fail(path, f"'{key}' must be a JSON object")
    variant = meta.get("variant")
    if variant is not None and not isinstance(variant, str):
        _fail(path, f"'variant' must be a string, got {variant!r}")
    d = SafetyDictionary(family, entries, extras["steering_defaults"], extras["provenance"], variant)
    try:
        d.default_config()
    except (TypeError, ValueError) as e:
        _fail(path, f"bad steering defaults {quoted(json.dumps(d.steering_defaults))}: {e}")
    bad = [k for k, v in d.steering_defaults.items()
           if isinstance(v, float) and not math.isfinite(v) and k in SteeringConfig.__dataclass_fields__]
    if bad:
        _fail(path, f"steering default '{bad[0]}' is not a finite number")
    return d


def summary(d: SafetyDictionary, path: str = "") -> str:
    lines = [f"SafeDIG dictionary {path}".rstrip(),
             f"  format v{FORMAT_VERSION}, family {d.family.upper()}, {len(d.entries)} position(s)"]
    if d.steering_defaults:
        lines.append("  steering defaults: " + ", ".join(f"{k}={v}" for k, v in d.steering_defaults.items()))
    if d.provenance:
        lines.append("  provenance: " + ", ".join(f"{k}={v}" for k, v in d.provenance.items()))
    lines.append(f"  {'position':<16}{'width':>7}{'latents':>9}{'k':>5}  {'act':<9}{'scale':>9}{'gate':>9}{'harmful':>9}"
                 "  top latents (score)")
    for p, e in sorted(d.entries.items()):
        s = e.sae
        top = sorted(zip(e.scores, e.harmful), reverse=True)[:5]
        tops = " ".join(f"{j}({v:.2f})" for v, j in top) or "-"
        lines.append(f"  {p.name:<16}{s.d:>7}{s.latents:>9}{s.k:>5}  {s.activation:<9}{float(s.scale):>9.4g}"
                     f"{e.gate_scale:>9.4g}{len(e.harmful):>9}  {tops}")
        if s.normalize != "none":
            lines.append(f"      input normalisation: {s.normalize}")
        if e.image_gate_scale is not None:
            lines.append(f"      per-image gate unit: {e.image_gate_scale:.4g}")
        if e.safe_targets is not None:
            lines.append(f"      Blend's targets: {e.safe_targets.shape[0]} safe exemplars")
        scalars = {k: v for k, v in e.metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        if scalars:  # per-category lists stay in the file's metadata; the summary shows the headline numbers
            lines.append("      metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in scalars.items()))
    return "\n".join(lines)


def parse_latents(text: str, latents: int, position, label: str = "latents") -> list[int]:
    """A comma (or space) separated list of latent indices of an SAE with `latents` latents, in order, without
    repeats; `label` (the widget or flag the text came from) starts every error."""
    out: list[int] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            j = int(part)
        except ValueError:
            raise ValueError(f"{label}: {part!r} is not a latent index (expected a comma list like 12,873,4051)") from None
        if not 0 <= j < latents:
            raise ValueError(f"{label}: latent {j} is out of range for position {position}, whose SAE has {latents} "
                             f"latents (0..{latents - 1})")
        if j not in out:
            out.append(j)
    return out
