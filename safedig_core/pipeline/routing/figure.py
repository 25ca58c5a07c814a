"""The routing report as a picture: every position's scores by depth, the selected ones marked."""
from __future__ import annotations

import math

import numpy as np

from ...formats.atomic import write_bytes
from ...formats.images import figure_png

_SERIES = (("R", "R routing score", "#111111", 2.6), ("T", "T transfer (LOCO AUROC)", "#1f77b4", 1.5),
           ("S", "S stability", "#2ca02c", 1.5), ("A", "A in-domain AUROC", "#ff7f0e", 1.5))
_MARKER = {"img": "o", "txt": "^"}
_LABEL_BOX = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8}
_GROUP_SHADE = {"visual_binding": "#e8eef8", "rendering": "#f6ece4", "text_binding": "#eaf4ea"}


def plot_report(report, path: str) -> str:
    """Write `routing_figure(report)` to `path` as a PNG (atomically); returns the path."""
    return write_bytes(path, figure_png(routing_figure(report), dpi=110))


def routing_figure(report):
    """The scores per position as a matplotlib Figure: one panel per stream (img: circles, txt: triangles), relative depth on
    x, R/T/S/A as series, functional groups shaded, selected positions ringed and named with their rank,
    the best fixed position (max A) starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe inside ComfyUI
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    streams = [s for s in ("img", "txt") if any(p.stream == s for p in report.scores)]
    fig = Figure(figsize=(13, 3.5 * len(streams) + 1.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(streams), 1, sharex=True, squeeze=False)[:, 0]
    sel = {n: i + 1 for i, n in enumerate(report.selected)}
    half = 0.5 / max(len({round(p.depth, 9) for p in report.scores}) - 1, 1)  # half the spacing of positions
    for ax, stream in zip(axes, streams):
        pts = sorted((p for p in report.scores if p.stream == stream), key=lambda p: p.depth)
        # functional groups as background bands (contiguous runs along depth)
        runs: list[list] = []
        for p in pts:
            if runs and runs[-1][-1].group == p.group:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            lo, hi = run[0].depth - half, run[-1].depth + half
            ax.axvspan(lo, hi, color=_GROUP_SHADE.get(run[0].group, "#eeeeee"), zorder=0, lw=0)
            ax.text((lo + hi) / 2, -0.085, run[0].group.replace("_", " "), ha="center", va="center", fontsize=8.5,
                    color="#555555", style="italic", zorder=1)
        xs = [p.depth for p in pts]
        for key, _, colour, lw in _SERIES:
            ys = [np.nan if getattr(p, key) is None else getattr(p, key) for p in pts]
            ax.plot(xs, ys, color=colour, lw=lw, marker=_MARKER[stream], ms=6.5 if key == "R" else 4.5,
                    zorder=4 if key == "R" else 3, alpha=1.0 if key == "R" else 0.8)
        ax.axhline(0.5, color="#888888", lw=0.9, ls=":", zorder=2)
        last_x, level = -1.0, 0
        for p in pts:
            ha = "left" if p.depth < 0.06 else ("right" if p.depth > 0.94 else "center")
            if p.name in sel:
                level = (level + 1) % 2 if p.depth - last_x < 0.18 else 0  # stagger labels of close neighbours
                last_x = p.depth
                ax.scatter([p.depth], [p.R], s=330, facecolors="none", edgecolors="#e0a800", lw=2.6, zorder=5)
                ax.annotate(f"#{sel[p.name]} {p.name}", (p.depth, p.R), xytext=(0, 13 + 15 * level),
                            textcoords="offset points", ha=ha, fontsize=9, fontweight="bold", color="#6b5000",
                            zorder=6, bbox=_LABEL_BOX)
            if p.name == report.best_fixed:
                ax.scatter([p.depth], [p.A], marker="*", s=300, color="#d62728", edgecolors="white", lw=0.8, zorder=6)
                ax.annotate(f"fixed: {p.name}", (p.depth, p.A), xytext=(0, -18), textcoords="offset points",
                            ha=ha, fontsize=8.5, color="#d62728", zorder=6,
                            bbox=_LABEL_BOX)
        ax.set_title(f"{stream} stream", fontsize=10.5, loc="left", fontweight="bold")
        ax.set_ylabel("score")
        ax.set_ylim(-0.13, 1.22)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.grid(True, axis="y", alpha=0.3, zorder=1)
    axes[-1].set_xlabel("relative depth in the stack (0 = first block, 1 = last; FLUX single blocks follow the "
                        "double ones)")
    axes[-1].set_xlim(-0.03, 1.03)
    handles = [Line2D([], [], color=c, lw=lw, label=label) for _, label, c, lw in _SERIES]
    handles += [Line2D([], [], ls="", marker=_MARKER[s], color="#444444", label=f"{s} stream") for s in streams]
    handles += [Line2D([], [], ls="", marker="o", ms=13, mfc="none", mec="#e0a800", mew=2.4, label="selected (#rank)"),
                Line2D([], [], ls="", marker="*", ms=14, color="#d62728", label="best fixed (max A)"),
                Line2D([], [], ls=":", color="#888888", label="chance (AUROC 0.5)")]
    groups = sorted({p.group for p in report.scores})
    handles += [Patch(color=_GROUP_SHADE.get(g, "#eeeeee"), label=g.replace("_", " ")) for g in groups]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8.5, frameon=False)
    w = report.config
    total = w["w_transfer"] + w["w_stability"] + w["w_separability"]
    formula = f"{w['w_transfer']:g}·T + {w['w_stability']:g}·S + {w['w_separability']:g}·A"
    formula = formula if abs(total - 1) < 1e-9 else f"({formula}) / {total:g}"
    fig.suptitle(f"SafeDIG routing — {report.family.upper()}, top {report.k}: {', '.join(report.selected)}   "
                 f"(fixed-layer baseline: {report.best_fixed})\nR = {formula};  T: {report.transfer_mode} over "
                 f"{len(report.categories)} source categories, {report.safe_prompts} safe prompts", fontsize=10.5)
    legend_rows = math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, 0.035 * legend_rows + 0.02, 1, 1))
    return fig
