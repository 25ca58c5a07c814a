"""Feature maps: where on the image a dictionary's harmful latents fire, position by position.

`MassRecorder` is a record callback for `comfyui.recording_model` (the block patches collection uses): at
each routed position it measures every image token's harmful mass with `PositionSteerer.harmful_mass`
(the steering maths lives only in steering.py) on the prompt (cond) rows, inside an optional window of the
schedule, and averages per sampler step, then over steps. `sample_maps` runs KSampler's own code path with
it installed; `render` turns the maps into heatmap overlays on the generated image, one panel per position,
titled with the position and the largest mass in gate units (mass / gate_scale: 1 = the steering gate at
τ = 1). Image tokens lie on the latent grid cut into patches: FLUX and SD3 use 2×2 latent patches, so a
1024² image (128² latent) is a 64×64 token grid.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from ...positions import Position
from ...schedule import half_rows, in_window
from ...steering import SteeringConfig
from .patches import progress_of, step_of


class FeatureMapError(ValueError):
    pass


class MassRecorder:
    """`record(position, x [B, T, d], transformer_options)`: accumulates harmful mass [B, T] per position
    and sampler step over the cond rows of each model call within [start, end) of the schedule."""

    def __init__(self, steerers: dict, start: float = 0.0, end: float = 1.0):
        self.steerers = steerers
        self.window = SteeringConfig(start=start, end=end)
        self.sums: dict = {}  # (position, step) -> [Σ mass [B, T], calls]

    def __call__(self, p: Position, x: torch.Tensor, to: dict) -> None:
        if not in_window(progress_of(to), self.window):
            return
        if to.get("cond_or_uncond"):
            x = x[half_rows(x.shape[0], to["cond_or_uncond"], "cond").to(x.device)]
            if x.shape[0] == 0:
                return
        with torch.no_grad():
            mass = self.steerers[p].harmful_mass(x).float().cpu()
        key = (p, step_of(to))
        acc = self.sums.get(key)
        if acc is None or acc[0].shape != mass.shape:
            self.sums[key] = [mass, 1]
        else:
            acc[0] += mass
            acc[1] += 1

    def maps(self, grid: tuple[int, int]) -> dict[Position, torch.Tensor]:
        """Mean over sampler steps of each step's mean mass, per position: [B, h_tokens, w_tokens]."""
        per: dict = {}
        for (p, _), (total, calls) in self.sums.items():
            per.setdefault(p, []).append(total / calls)
        out = {}
        for p, steps in per.items():
            mean = torch.stack(steps).mean(0)
            if mean.shape[1] != grid[0] * grid[1]:
                raise FeatureMapError(f"position {p}: {mean.shape[1]} image tokens do not fill a {grid[0]}×{grid[1]} "
                                      "token grid")
            out[p] = mean.reshape(mean.shape[0], *grid)
        return out


def token_grid(diffusion_model, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h_tokens, w_tokens) of a latent of spatial size `latent_hw`: the DiT pads it to whole patches."""
    p = diffusion_model.patch_size
    ph, pw = (p[-2], p[-1]) if isinstance(p, (tuple, list)) else (p, p)
    return math.ceil(latent_hw[0] / ph), math.ceil(latent_hw[1] / pw)


def sample_maps(model, steerers: dict, positions: list[Position], positive, negative, latent: dict, seed: int,
                steps: int, cfg: float, sampler: str, scheduler: str, start: float = 0.0, end: float = 1.0,
                denoise: float = 1.0):
    """KSampler (`nodes.common_ksampler`, progress bar included) with a MassRecorder at `positions`.
    Returns (the output LATENT dict, {position: mass [B, h_tokens, w_tokens] in gate units})."""
    import nodes

    from .runtime import layout_of, recording_model

    missing = [str(p) for p in positions if p not in steerers]
    if missing:
        raise FeatureMapError(f"no SAE for position(s) {', '.join(missing)} in the dictionary")
    if not positions:
        raise FeatureMapError("no image-stream positions to map (feature maps place image tokens on the image)")
    text = [str(p) for p in positions if p.stream != "img"]
    if text:
        raise FeatureMapError(f"{', '.join(text)}: text-stream positions have no place on the image; "
                              "choose .img positions")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise FeatureMapError(f"feature maps need an image latent [B, C, H, W], got shape {list(samples.shape)}")
    dm = model.get_model_object("diffusion_model")
    rec = MassRecorder(steerers, start, end)
    m = recording_model(model, positions, rec, layout_of(model))
    out = nodes.common_ksampler(m, seed, steps, cfg, sampler, scheduler, positive, negative, latent, denoise=denoise)[0]
    maps = rec.maps(token_grid(dm, tuple(samples.shape[-2:])))
    if not maps:
        raise FeatureMapError(f"nothing was recorded: no sampler step fell in the window [{start}, {end})")
    return out, {p: maps[p] / steerers[p].gate_scale for p in positions if p in maps}


def overlay(image: np.ndarray, mass: np.ndarray, vmax: float, cmap: str = "inferno", alpha: float = 0.75) -> np.ndarray:
    """uint8 [H, W, 3]: `mass` [h, w] upsampled (bilinear) to the image and colour-mapped on it, opaque where the
    mass reaches `vmax` and transparent where it is 0."""
    from matplotlib import colormaps

    h, w = image.shape[:2]
    up = F.interpolate(torch.as_tensor(mass, dtype=torch.float32)[None, None], size=(h, w), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    level = np.clip(up / vmax, 0.0, 1.0)[..., None]
    colour = colormaps[cmap](level[..., 0])[..., :3] * 255.0
    return np.clip(image * (1 - alpha * level) + colour * alpha * level, 0, 255).round().astype(np.uint8)


def panel(image: np.ndarray, mass: np.ndarray, title: str, size: tuple[float, float] = (3.4, 3.6),
          dpi: int = 100) -> np.ndarray:
    """One position's panel, uint8 [size·dpi]: the overlay, its title and a colour bar in gate units (the bar
    tops out at max(1, the largest mass), so 1 = the steering gate at τ = 1 is always on it)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from ...formats.images import figure_array

    vmax = max(float(mass.max()), 1.0)
    fig = Figure(figsize=size)
    ax = fig.add_axes((0.02, 0.04, 0.78, 0.84))
    ax.imshow(overlay(image, mass, vmax), interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8.5)
    cax = fig.add_axes((0.84, 0.1, 0.05, 0.72))
    fig.colorbar(ScalarMappable(Normalize(0, vmax), "inferno"), cax=cax).ax.tick_params(labelsize=7)
    return figure_array(fig, dpi)


def render(image: np.ndarray, maps: dict[Position, torch.Tensor], index: int = 0) -> list[np.ndarray]:
    """The panels of image `index` of the batch, one per position, all the same size."""
    out = []
    for p, m in maps.items():
        mass = m[index].numpy()
        out.append(panel(image, mass, f"{p.name}: max {mass.max():.2f} gate units"))
    return out


def summary(maps: dict[Position, torch.Tensor]) -> str:
    return "\n".join(f"{p.name}: harmful mass in gate units, max {float(m.max()):.3f}, mean {float(m.mean()):.3f}, "
                     f"{int((m > 1).sum())} of {m.numel()} tokens above 1" for p, m in maps.items())


def save_png(path: str, panels: list[np.ndarray]) -> str:
    """The panels side by side, one PNG (written atomically)."""
    from ...formats.images import save_png as write

    return write(path, np.concatenate(panels, axis=1))
