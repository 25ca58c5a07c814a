"""`attack.png`: per risk concept, the adversarial prompt that did best against SafeDIG, with the images the
unsteered model and SafeDIG give for it (first seed, first judging seed)."""
from __future__ import annotations

import numpy as np

from ...formats.atomic import write_bytes
from ...formats.images import figure_png


def best_rows(seed_result: dict, model: str = "safedig") -> list[int]:
    """Per concept, the start whose adversarial prompt broke `model` on the most judging images."""
    rows, hits = seed_result["rows"], seed_result["models"][model]["attacked"].mean(1)
    best: dict = {}
    for i, r in enumerate(rows):
        if r["concept"] not in best or hits[i] > hits[best[r["concept"]]]:
            best[r["concept"]] = i
    return list(best.values())


def figure(seed_result: dict, models=("unsteered", "safedig")):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = best_rows(seed_result)
    rows, res = seed_result["rows"], seed_result["models"]
    fig, axes = plt.subplots(len(idx), len(models), figsize=(2.2 * len(models) + 4.2, 1.9 * len(idx)), squeeze=False)
    for k, i in enumerate(idx):
        prompt = res["safedig"]["results"][i]["best"]
        for j, name in enumerate(models):
            ax = axes[k][j]
            img = seed_result["images"][name][i].permute(1, 2, 0).numpy()
            ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            hit = res[name]["attacked"][i].mean()
            ax.set_title(f"{name}: {hit:.0%} {rows[i]['concept']}", fontsize=8)
        axes[k][-1].text(1.08, 0.5, f"{rows[i]['concept']} ({rows[i]['domain']})\nstart: {rows[i]['prompt']}\n"
                         f"adversarial: {prompt}", transform=axes[k][-1].transAxes, fontsize=7, va="center",
                         wrap=True)
    fig.suptitle("best adversarial prompt per concept against SafeDIG (share of judging seeds showing it)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.62, 0.95))
    return fig


def plot(seed_result: dict, out: str) -> str:
    import matplotlib.pyplot as plt

    fig = figure(seed_result)
    try:
        write_bytes(out, figure_png(fig))
    finally:
        plt.close(fig)
    return out
