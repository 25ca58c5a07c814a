"""`safedig plot`: pictures of a dictionary's harmful latents, of a routing report and of before/after images.

Matplotlib through the Agg canvas only (no pyplot: no global backend state, safe inside ComfyUI); every file
is written atomically and its path printed.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..formats.atomic import write_bytes
from ..formats.images import ImageError, figure_png, list_images, png_bytes, read_rgb

_HEADLINE = ("fvu", "l0", "dead_frac", "auroc", "separation")  # metrics shown in a features panel title, if present


# -------------------------------------------------------------------------------------------- features

def features_figure(d, top: int = 8):
    """One panel per position: its harmful latents' scores, sorted, the `top` highest labelled by latent index;
    the title gives the gate scale and headline metrics."""
    from matplotlib.figure import Figure

    entries = [d.entries[p] for p in d.positions]
    if not entries:
        raise ValueError("the dictionary has no positions to plot")
    fig = Figure(figsize=(10, 2.3 * len(entries) + 0.8))
    axes = fig.subplots(len(entries), 1, squeeze=False)[:, 0]
    for ax, e in zip(axes, entries):
        order = sorted(zip(e.scores, e.harmful), reverse=True)
        scores = [s for s, _ in order]
        metrics = [f"{k}={e.metrics[k]:.3g}" for k in _HEADLINE if isinstance(e.metrics.get(k), (int, float))]
        ax.set_title(f"{e.position.name}: {len(e.harmful)} harmful of {e.sae.latents} latents, gate_scale "
                     f"{e.gate_scale:.3g}" + (", " + ", ".join(metrics) if metrics else ""), fontsize=9.5, loc="left")
        if not order:
            ax.text(0.5, 0.5, "no harmful latents", ha="center", va="center", transform=ax.transAxes, color="#888888")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        xs = np.arange(len(scores))
        ax.bar(xs, scores, color=["#c0392b" if i < top else "#e8a598" for i in xs], width=0.85)
        for i, (s, j) in enumerate(order[:top]):
            ax.annotate(f"#{j}", (i, s), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7.5, rotation=90 if len(order) > 20 else 0)
        ax.set_ylabel("harm score (smd)")
        ax.set_xlim(-0.6, max(len(scores), 10) - 0.4)
        ax.set_ylim(min(0.0, min(scores) * 1.1), max(scores) * 1.25 if max(scores) > 0 else 1.0)
        ax.grid(True, axis="y", alpha=0.3)
    axes[-1].set_xlabel("harmful latents, by score (labels: latent index)")
    fig.suptitle(f"SafeDIG dictionary — {d.family.upper()}, {len(entries)} position(s)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_features(dict_path: str, out: str) -> str:
    from ..formats import dictionary

    return write_bytes(out, figure_png(features_figure(dictionary.load(dict_path)), dpi=100))


# --------------------------------------------------------------------------------------------- routing

def plot_routing(json_path: str, out: str) -> str:
    """`routing.plot_report` when the JSON is a full RoutingReport, else a bar chart of the scores it holds."""
    from ..pipeline import routing

    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such routing report: {json_path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is not JSON ({e})") from None
    scores = data.get("scores") if isinstance(data, dict) else None
    if not isinstance(scores, list) or not scores or not all(isinstance(s, dict) and "name" in s for s in scores):
        raise ValueError(f"{json_path} is not a routing report (`safedig route` writes routing.json with a "
                         "`scores` list of positions)")
    try:
        report = routing.RoutingReport.from_dict(data)
    except (TypeError, KeyError):
        report = None
    if report is not None:
        return routing.plot_report(report, out)
    return write_bytes(out, figure_png(_scores_figure(scores, data.get("selected") or [], json_path)))


def _scores_figure(scores: list[dict], selected: list[str], title: str):
    from matplotlib.figure import Figure

    keys = [k for k in ("R", "T", "S", "A") if any(isinstance(s.get(k), (int, float)) for s in scores)]
    if not keys:
        raise ValueError(f"{title}: its positions carry none of the scores R, T, S, A")
    names = [s["name"] for s in scores]
    fig = Figure(figsize=(max(6, 0.5 * len(names) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ys = [s.get(k) if isinstance(s.get(k), (int, float)) else np.nan for s in scores]
        ax.bar(np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width, ys, width, label=k)
    ax.set_xticks(np.arange(len(names)), [n + (" *" if n in selected else "") for n in names], rotation=60, ha="right",
                  fontsize=8)
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.set_title(f"routing scores ({os.path.basename(title)}; * = selected)", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ grid

def pairs(before_dir: str, after_dir: str) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(name, before file, after file) for the file names both folders hold, and the names only one holds."""
    for d in (before_dir, after_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"no such folder: {d}")
    before = {os.path.basename(f): f for f in list_images([before_dir])}
    after = {os.path.basename(f): f for f in list_images([after_dir])}
    both = sorted(before.keys() & after.keys())
    if not both:
        raise ImageError(f"{before_dir} and {after_dir} share no image file names: pairs are matched by name")
    return [(n, before[n], after[n]) for n in both], sorted(before.keys() ^ after.keys())


def _label_lookup(csv_paths: list[str]) -> dict[str, bool]:
    """Eval-CSV verdicts keyed by normalised path as written, absolute path, and file name where unambiguous."""
    from .detectors import read_labels

    out, names = {}, {}
    for path in csv_paths:
        for key, flag in read_labels(path).items():
            out[os.path.normpath(key)] = out[os.path.abspath(key)] = flag
            names.setdefault(os.path.basename(key), []).append(flag)
    for name, flags in names.items():
        if len(flags) == 1:  # the same file name under both folders: only full paths can tell them apart
            out.setdefault(name, flags[0])
    return out


def _verdict(labels: dict[str, bool], path: str) -> bool | None:
    for key in (os.path.normpath(path), os.path.abspath(path), os.path.basename(path)):
        if key in labels:
            return labels[key]
    return None


def grid_image(items: list[tuple[str, str, str]], labels: dict[str, bool] | None = None, cols: int = 4,
               size: int = 128) -> np.ndarray:
    """Cells of `before | after` pairs with their file names; unsafe images (per `labels`) framed in red."""
    from PIL import Image, ImageDraw

    pad, head, caption, frame = 10, 22, 16, 3
    cell_w, cell_h = 2 * size + frame * 4, size + caption + frame * 2
    rows = -(-len(items) // cols)
    ncols = min(cols, len(items))
    canvas = Image.new("RGB", (pad + ncols * (cell_w + pad), head + rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    note = "each pair: before | after" + ("; red frame = unsafe (eval CSV)" if labels else "")
    draw.text((pad, 5), note, fill="black")
    for i, (name, *files) in enumerate(items):
        x0, y0 = pad + (i % cols) * (cell_w + pad), head + (i // cols) * (cell_h + pad)
        for k, f in enumerate(files):
            img = Image.fromarray(read_rgb(f))
            scale = size / max(img.size)
            resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample)
            x, y = x0 + frame + k * (size + 2 * frame), y0 + frame
            canvas.paste(img, (x + (size - img.width) // 2, y + (size - img.height) // 2))
            if labels and _verdict(labels, f):
                box = [x - frame, y - frame, x + size + frame - 1, y + size + frame - 1]
                draw.rectangle(box, outline=(220, 20, 20), width=frame)
        short = name if len(name) <= 2 * size // 6 else name[: 2 * size // 6 - 1] + "…"
        draw.text((x0 + frame, y0 + size + 2 * frame + 1), short, fill="black")
    return np.asarray(canvas)


def plot_grid(before_dir: str, after_dir: str, out: str, labels: list[str] | None = None, cols: int = 4,
              size: int = 128) -> tuple[str, list[str]]:
    items, unpaired = pairs(before_dir, after_dir)
    lookup = _label_lookup(labels) if labels else None
    return write_bytes(out, png_bytes(grid_image(items, lookup, cols, size))), unpaired


# ---------------------------------------------------------------------------------------------- curves

_PANELS = (("safe_fidelity", "unsafe_rate.source"), ("safe_fidelity", "unsafe_rate.target"),
           ("safe_change", "unsafe_rate.source"), ("safe_change", "unsafe_rate.target"))
_LABELS = {"safe_fidelity": "safe fidelity (eval)", "safe_change": "safe Δ (mean |Δpixel|, eval)",
           "unsafe_rate.source": "unsafe rate, source (eval)", "unsafe_rate.target": "unsafe rate, target (eval)"}


def curves_figure(report: dict):
    """Trade-off curves of a demo report: for every variant, the mean over seeds of the evaluation figures at
    each knob value (τ, or strength for ungated steering), its operating point chosen on the building prompts
    (star: mean over seeds of the chosen points), the unsteered model and the word filter."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9))
    axes = fig.subplots(2, 2).ravel()
    curves = report["curves"]
    colours = {}
    palette = ("#c0392b", "#2980b9", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#2c3e50")
    iv = report["intervals"]
    for ax, (x, y) in zip(axes, _PANELS):
        for i, (name, c) in enumerate(curves.items()):
            col = colours.setdefault(name, palette[i % len(palette)])
            xs = [p["eval"][x] for p in c["points"]]
            ys = [p["eval"][y] for p in c["points"]]
            lw, style = (2.4, "-") if name == "steered" else (1.2, "--" if name == "steered_strength" else "-")
            label = ("SafeDIG" if name == "steered" else name) + f" ({'τ' if c['knob'] == 'threshold' else 'strength'})"
            ax.plot(xs, ys, style, marker="o", ms=3.5, lw=lw, color=col, label=label)
            if name in iv:
                ax.plot([iv[name][x]["mean"]], [iv[name][y]["mean"]], marker="*", ms=13, color=col,
                        markeredgecolor="black", linestyle="none")
        u = iv["unsteered"]
        ax.plot([u[x]["mean"]], [u[y]["mean"]], marker="s", ms=8, color="black", linestyle="none", label="unsteered")
        if "word_filter" in iv:
            w = iv["word_filter"]
            ax.plot([w[x]["mean"]], [w[y]["mean"]], marker="X", ms=9, color="#f39c12", linestyle="none",
                    label="word filter")
        ax.set_xlabel(_LABELS[x])
        ax.set_ylabel(_LABELS[y])
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7.5, loc="best")
    seeds = report.get("seeds", [])
    fig.suptitle(f"SafeDIG trade-off curves, mean over seeds {seeds} (stars: operating points chosen on building "
                 "prompts)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_curves(report: dict, out: str) -> str:
    return write_bytes(out, figure_png(curves_figure(report), dpi=100))
