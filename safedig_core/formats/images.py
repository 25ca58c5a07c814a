"""Image files in and out for evaluation and pictures: find the images a user names (files and folders),
read them as RGB, convert ComfyUI IMAGE tensors, render matplotlib figures, and write PNGs atomically
(`atomic.write_bytes`), so an interrupted run never leaves a truncated file."""
from __future__ import annotations

import io
import os

import numpy as np

from .atomic import write_bytes

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class ImageError(ValueError):
    """An image path or tensor that cannot be used; the message names it and says what to do."""


def list_images(paths: list[str]) -> list[str]:
    """The image files among `paths`: files as given, folders expanded (not recursively) to their
    .png/.jpg/.jpeg/.webp files in name order."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.lower().endswith(EXTENSIONS))
            found = [f for f in found if os.path.isfile(f)]
            if not found:
                raise ImageError(f"folder {path} holds no {'/'.join(e[1:] for e in EXTENSIONS)} images")
            out += found
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    return out


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3]; transparency is composited on white, greyscale and palettes become RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"cannot read image {path}: {e} (use a png, jpg or webp file)") from None


def from_tensor(images) -> list[np.ndarray]:
    """A ComfyUI IMAGE (float [B, H, W, C] in 0..1, C = 3 or 4) as uint8 RGB arrays [H, W, 3]."""
    import torch

    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[-1] not in (3, 4):
        raise ImageError(f"expected an IMAGE batch [B, H, W, 3], got a tensor of shape {list(shape)}")
    arr = images[..., :3].detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return [a.numpy() for a in arr]


def to_tensor(arrays: list[np.ndarray]):
    """uint8 RGB arrays of one size → a ComfyUI IMAGE float [B, H, W, 3] in 0..1."""
    import torch

    return torch.from_numpy(np.stack(arrays)).float().div(255)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str, array: np.ndarray) -> str:
    """Write uint8 [H, W, 3] as a PNG, atomically; returns the path."""
    return write_bytes(path, png_bytes(array))


def figure_png(fig, dpi: int = 100) -> bytes:
    """PNG bytes of a matplotlib Figure (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_array(fig, dpi: int = 100) -> np.ndarray:
    """A matplotlib Figure rendered to uint8 RGB [H, W, 3] (H, W = figure size × dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
