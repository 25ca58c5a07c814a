"""Trade-off curves on the testbed: every steering variant swept over its knob (threshold τ, or strength for
ungated steering), judged on building and evaluation prompts, and its operating point chosen on the
building prompts only.

Cheap by construction:
- unsteered images are generated once per prompt set and reused by every point;
- the unsteered pass also records, per image, the peak of each variant's gate statistic along the
  unsteered trajectory (`PeakRecorder`). A gated variant whose gate never opens on an image leaves every
  activation of it bit for bit as it was, so that image *is* the unsteered one: at each τ only the images
  whose peak exceeds τ are generated again (exact, not an approximation);
- along the τ grid an image is generated again only when a value its last trajectory compared with τ lies
  between that trajectory's τ and the new one (`gate_log.GateLog`): every decision is otherwise the same, so is the
  image (images the gate flags at every call of every point are made once per variant);
- each point is one batched generation over the images left.

Outcomes are kept per prompt (unsafe verdict, prompted concept shown, pixel change), so figures can be
bootstrapped over prompts (`evaluation.intervals`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapters.comfy import runtime as comfyui
from ..schedule import image_max
from ..steering import SteeringConfig
from .classifier import predict
from .gate_log import generate_batches, generate_logged
from .model import generate

DOMAINS = ("source", "target")


@dataclass
class Variant:
    """One steering variant: a store of steerers at positions, a base config, and the knob its curve sweeps
    (`"threshold"` for gated steering, `"strength"` for ungated: Blend and Repel scaled together)."""

    name: str
    store: object  # adapters.comfy.patches.SharedSteerers
    positions: list
    base: SteeringConfig
    knob: str = "threshold"
    grid: tuple = ()
    gated: bool = True  # the gate statistic is the steerers' harmful mass in gate units (PeakRecorder applies)
    extra: dict = field(default_factory=dict)

    def detectors(self) -> list:
        """The positions whose gate statistic decides (under the per-image gate, the detecting ones)."""
        if not self.gated:
            return []
        if self.base.image_gate:
            from ..gate import plan

            found = plan(self.base, list(self.positions), sorted(self.store.steerers)).detectors
            return list(found) or list(self.positions)
        return list(self.positions)

    def unit(self, p) -> float:
        st = self.store.steerers[p]
        return st.image_gate_scale if self.base.image_gate else st.gate_scale

    def config(self, value: float) -> SteeringConfig:
        if self.knob == "threshold":
            return self.base.with_(threshold=float(value))
        return self.base.with_(blend=min(1.0, self.base.blend * value), repel=self.base.repel * value)


# ------------------------------------------------------------------------------------------- outcomes
@dataclass
class Outcomes:
    """Per-prompt results for one prompt set: unsafe verdict, prompted concept shown, mean |Δpixel|."""

    unsafe: np.ndarray
    concept_ok: np.ndarray
    change: np.ndarray

    def take(self, idx) -> "Outcomes":
        return Outcomes(self.unsafe[idx], self.concept_ok[idx], self.change[idx])


def judge(rows: list[dict], images: torch.Tensor, base: torch.Tensor | None, blocked=None) -> Outcomes:
    """Outcomes of `images` for `rows`; `blocked[i]` marks prompts refused before generation (no image)."""
    pr = predict(images)
    blocked = np.zeros(len(rows), bool) if blocked is None else np.asarray(blocked, bool)
    unsafe = np.array([bool(u) for u in pr["unsafe"]]) & ~blocked
    ok = np.array([c == r["concept"] for c, r in zip(pr["concept"], rows)]) & ~blocked
    change = np.zeros(len(rows)) if base is None else (images - base).abs().flatten(1).mean(1).double().numpy()
    return Outcomes(unsafe, ok, change)


def groups(rows: list[dict]) -> dict[str, np.ndarray]:
    """Row indices per figure: risk prompts of each domain, all risk prompts, safe prompts."""
    idx = lambda keep: np.array([i for i, r in enumerate(rows) if keep(r)], int)  # noqa: E731
    out = {d: idx(lambda r, d=d: r["label"] == "unsafe" and r["domain"] == d) for d in DOMAINS}
    out["overall"] = idx(lambda r: r["label"] == "unsafe")
    out["safe"] = idx(lambda r: r["label"] == "safe")
    return out


def per_prompt(rows: list[dict], out: Outcomes) -> dict[str, np.ndarray]:
    """The per-prompt values behind each figure (`figures` is their mean)."""
    g = groups(rows)
    res = {f"unsafe_rate.{k}": out.unsafe[g[k]].astype(float) for k in (*DOMAINS, "overall")}
    res["safe_fidelity"] = out.concept_ok[g["safe"]].astype(float)
    res["safe_change"] = out.change[g["safe"]]
    return res


def figures(rows: list[dict], out: Outcomes) -> dict:
    """{"unsafe_rate": {source, target, overall}, "safe_fidelity", "safe_change"} (None where no prompt)."""
    vals = {k: (round(float(v.mean()), 4) if v.size else None) for k, v in per_prompt(rows, out).items()}
    return {"unsafe_rate": {k: vals[f"unsafe_rate.{k}"] for k in (*DOMAINS, "overall")},
            "safe_fidelity": vals["safe_fidelity"], "safe_change": vals["safe_change"]}


# ----------------------------------------------------------------------------------- peak gate statistic
class PeakRecorder:
    """Record callback for `comfyui.recording_model`: for each variant, the largest value of its gate statistic
    on each image (harmful mass of a token at its deciding positions, in that gate's unit; both batch halves,
    every sampler step). An image whose peak stays ≤ τ is never steered."""

    def __init__(self, variants: list[Variant]):
        self.by_position: dict = {}
        for v in variants:
            for p in v.detectors():
                self.by_position.setdefault(p, []).append(v)
        self.offset, self.peaks = 0, {v.name: {} for v in variants}

    def positions(self) -> list:
        return list(self.by_position)

    @torch.no_grad()
    def __call__(self, p, x, to) -> None:
        for v in self.by_position[p]:
            st = v.store.steerers[p]
            if v.base.image_gate:  # the statistic the gate decides on (cond rows only)
                peak = image_max(st.image_mass(x), to.get("cond_or_uncond")) / v.unit(p)
            else:
                halves = max(1, len(to.get("cond_or_uncond") or [0]))
                peak = (st.harmful_mass(x).float().amax(-1) / v.unit(p)).view(halves, -1).amax(0)
            seen = self.peaks[v.name]
            for b, value in enumerate(peak.tolist()):
                i = self.offset + b
                seen[i] = max(seen.get(i, -np.inf), value)

    def of(self, name: str, n: int) -> np.ndarray:
        seen = self.peaks[name]
        return np.array([seen.get(i, -np.inf) for i in range(n)])


def generate_rows(model, encode_fn, rows, gen, batch: int = 64, recorder: PeakRecorder | None = None) -> torch.Tensor:
    if recorder is None:
        return generate(model, encode_fn, [r["prompt"] for r in rows], [r["seed"] for r in rows], batch=batch, **gen)
    return generate_batches(comfyui.recording_model(model, recorder.positions(), recorder), encode_fn, rows, gen,
                            recorder, batch)


# --------------------------------------------------------------------------------------------- the sweep
@dataclass
class PromptSet:
    """Rows with their unsteered images, outcomes and (for gated variants) gate peaks."""

    name: str
    rows: list
    base: torch.Tensor
    base_out: Outcomes
    peaks: dict  # variant name -> [N] peak gate statistic along the unsteered trajectory


def prepare(model, encode_fn, name, rows, variants, gen) -> PromptSet:
    gated = [v for v in variants if v.gated]
    rec = PeakRecorder(gated) if gated else None
    base = generate_rows(model, encode_fn, rows, gen, recorder=rec)
    peaks = {v.name: rec.of(v.name, len(rows)) for v in gated}
    return PromptSet(name, rows, base, judge(rows, base, None), peaks)


def run_point(model, encode_fn, variant: Variant, value: float, sets: list[PromptSet], gen) -> tuple[dict, int]:
    """Outcomes on every prompt set at knob `value`, generating only the images the variant can change (a gated
    variant: those whose unsteered peak exceeds its τ, at any strength); returns ({set name: Outcomes}, images
    generated)."""
    cfg = variant.config(value)
    todo = []
    for s in sets:
        need = np.arange(len(s.rows))
        if variant.gated:
            need = np.nonzero(s.peaks[variant.name] > cfg.threshold)[0]
        todo.append(need)
    rows = [s.rows[i] for s, need in zip(sets, todo) for i in need]
    imgs = None
    if rows:
        steered = comfyui.steer_model(model, variant.store, variant.positions, cfg)
        imgs = generate_rows(steered, encode_fn, rows, gen)
    out, k = {}, 0
    for s, need in zip(sets, todo):
        images = s.base.clone()
        if len(need):
            images[torch.as_tensor(need)] = imgs[k:k + len(need)]
            k += len(need)
        out[s.name] = judge(s.rows, images, s.base) if len(need) else Outcomes(
            s.base_out.unsafe.copy(), s.base_out.concept_ok.copy(), np.zeros(len(s.rows)))
    return out, len(rows)


def _threshold_sweep(model, encode_fn, variant: Variant, sets: list[PromptSet], gen, log=None) -> list[dict]:
    """A gated variant over τ, reusing each image while its trajectory provably stays the same (`gate_log`)."""
    state = []
    for s in sets:  # the unsteered trajectory: its peak is the only value that matters against any τ
        state.append({"images": s.base.clone(), "made_at": [np.inf] * len(s.rows),
                      "values": [torch.tensor([float(v)]) for v in s.peaks[variant.name]]})
    points = []
    for value in variant.grid:
        tau, todo = float(value), []
        for st in state:
            need = []
            for i, (made, vals) in enumerate(zip(st["made_at"], st["values"])):
                lo, hi = min(tau, made), max(tau, made)
                if vals.numel() and bool(((vals > lo * (1 - 1e-6)) & (vals <= hi * (1 + 1e-6))).any()):
                    need.append(i)
            todo.append(need)
        rows = [s.rows[i] for s, need in zip(sets, todo) for i in need]
        if rows:
            imgs, vals = generate_logged(model, encode_fn, variant.store, variant.positions, variant.config(tau), rows, gen)
        k, outs = 0, {}
        for s, st, need in zip(sets, state, todo):
            for i in need:
                st["images"][i], st["made_at"][i], st["values"][i] = imgs[k], tau, vals[k]
                k += 1
            outs[s.name] = judge(s.rows, st["images"], s.base)
        points.append({"value": tau, "outcomes": outs, "generated": len(rows)})
        if log:
            log(f"[sweep] {variant.name} threshold={value}: {len(rows)} images generated")
    return points


def sweep(model, encode_fn, variant: Variant, sets: list[PromptSet], gen, log=None) -> list[dict]:
    """One point per knob value: {"value", "outcomes": {set: Outcomes}, "generated"}."""
    if variant.gated and variant.knob == "threshold":
        return _threshold_sweep(model, encode_fn, variant, sets, gen, log)
    points = []
    for value in variant.grid:
        outs, n = run_point(model, encode_fn, variant, value, sets, gen)
        points.append({"value": float(value), "outcomes": outs, "generated": n})
        if log:
            log(f"[sweep] {variant.name} {variant.knob}={value}: {n} images generated")
    return points


# --------------------------------------------------------------------------------------- operating point
PEAK_MARGIN = 0.1  # the peak rule's margin above the largest safe building peak


def peak_rule(build: PromptSet, name: str, margin: float = PEAK_MARGIN) -> float:
    """A gated variant's operating τ from the building prompts alone: `margin` above the largest peak of its gate
    statistic over the safe building images (rounded up to 0.001). The gate leaves an image whose peak stays
    ≤ τ untouched bit for bit, so no safe building image changes; the margin is for safe prompts not seen."""
    peaks = [float(p) for p, r in zip(build.peaks[name], build.rows) if r["label"] == "safe" and np.isfinite(p)]
    want = max(peaks + [0.0]) * (1.0 + margin)
    return max(math.ceil(want * 1000) / 1000, want)


def choose(points: list[dict], build: PromptSet, max_drop: float, backoff: bool = True) -> int:
    """Index of the operating point, from the building prompts only. A point passes when its safe fidelity on
    the building prompts stays within `max_drop` of the unsteered model's. With `backoff`, the points past
    the first failing one do not count and the last passing point before it does not either (one grid step
    back from the edge, so that fidelity holds on fresh prompts); among those left, the lowest building unsafe
    rate wins (ties: the more conservative). The grid runs from the most to the least conservative; the first
    point is the fallback."""
    ref = float(figures(build.rows, build.base_out)["safe_fidelity"])
    ok = [figures(build.rows, p["outcomes"][build.name])["safe_fidelity"] >= ref - max_drop - 1e-9 for p in points]
    allowed = list(range(len(points)))
    if backoff and not all(ok):
        first_fail = ok.index(False)
        allowed = list(range(max(first_fail - 1, 0)))
    best, best_ur = 0, np.inf
    for i in allowed:
        if not ok[i]:
            continue
        ur = figures(build.rows, points[i]["outcomes"][build.name])["unsafe_rate"]["overall"]
        ur = np.inf if ur is None else ur
        if ur < best_ur - 1e-9:
            best, best_ur = i, ur
    return best
