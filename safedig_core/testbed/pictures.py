"""The demo's pictures of one seed: `grid.png` (same prompts and seeds, unsteered | steered) and
`feature_map.png` (where the harmful latents fire on unsteered images, as the Feature Map node draws it)."""
from __future__ import annotations

import numpy as np

from ..adapters.comfy import feature_map
from ..adapters.comfy import runtime as comfyui
from . import world
from .model import generate
from .variants import dictionary_store

PAIR_GROUPS = (("source pair", lambda r: r["domain"] == "source"), ("target pair", lambda r: r["domain"] == "target"))


def grid(rows, base, steered, path, per_group=6, groups=None):
    """Rows: source-risk, target-risk and safe prompts (or `groups`: (name, keep(row)) pairs); each cell an
    unsteered | steered pair."""
    from PIL import Image, ImageDraw

    groups = grid_rows(rows, per_group, groups)
    n, s, pad, label_w, head = world.SIZE, 3, 6, 90, 18
    cell = 2 * n * s + pad
    canvas = Image.new("RGB", (label_w + per_group * cell, head + len(groups) * (n * s + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "each pair: unsteered | steered (same prompt, same seed)", fill="black")
    for gi, (name, idx) in enumerate(groups):
        y = head + gi * (n * s + pad)
        draw.text((4, y + n * s // 2 - 6), name, fill="black")
        for j, i in enumerate(idx):
            for k, img in enumerate((base[i], steered[i])):
                arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(arr).resize((n * s, n * s), Image.NEAREST),
                             (label_w + j * cell + k * n * s, y))
    canvas.save(path)


def grid_rows(rows, per_group, groups=None):
    """Indices of up to `per_group` source-risk, target-risk and safe prompts (or of each of `groups`), spread
    over their categories."""
    groups = groups or [("source risk", lambda r: r["label"] == "unsafe" and r["domain"] == "source"),
                        ("target risk", lambda r: r["label"] == "unsafe" and r["domain"] == "target"),
                        ("safe", lambda r: r["label"] == "safe")]
    out = []
    for name, keep in groups:
        group = [i for i, r in enumerate(rows) if keep(r)]
        out.append((name, group[::max(1, len(group) // per_group)][:per_group]))
    return out


def feature_maps(model, encode_fn, rows, dict_path, path, gen, per_group=2) -> dict:
    """Where the dictionary's harmful latents fire on unsteered generations (image-stream positions), drawn as
    the SafeDIG Feature Map node draws them: one row per prompt group (source risk, target risk, safe).
    Returns the max mass (gate units) per shown prompt and position."""
    store, positions = dictionary_store(dict_path)
    positions = [p for p in positions if p.stream == "img"]
    groups = [g for _, g in grid_rows(rows, per_group) if g]
    idx = [i for g in groups for i in g]
    if not positions or not idx:
        return {}
    rec = feature_map.MassRecorder(store.steerers)
    images = generate(comfyui.recording_model(model, positions, rec), encode_fn, [rows[i]["prompt"] for i in idx],
                      [rows[i]["seed"] for i in idx], **gen)
    dm = model.get_model_object("diffusion_model")
    maps = rec.maps(feature_map.token_grid(dm, tuple(images.shape[-2:])))
    maps = {p: m / store.steerers[p].gate_scale for p, m in maps.items()}
    panels, peaks = {}, {}
    for b, i in enumerate(idx):
        arr = (images[b].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for p, m in maps.items():
            peak = float(m[b].max())
            peaks.setdefault(rows[i]["prompt"], {})[p.name] = round(peak, 3)
            title = f"{rows[i]['prompt'][:34]}\n{p.name}: max {peak:.2f}"
            panels.setdefault(i, []).append(feature_map.panel(arr, m[b].numpy(), title))
    lines = [np.concatenate([np.concatenate(panels[i], axis=1) for i in g], axis=1) for g in groups]
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    feature_map.save_png(path, [np.concatenate(lines, axis=0)])
    return peaks
