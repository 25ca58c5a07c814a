"""Feature maps: the recorder's averaging (cond rows, steps, window), maps from real KSampler runs of tiny
FLUX/SD3 models, the rendered panels and PNG, and the Feature Map node end to end in the real ComfyUI."""
from __future__ import annotations

import io
from importlib import import_module

import numpy as np
import pytest
import torch
from conftest import make_dictionary
from PIL import Image

from safedig_core.adapters.comfy import feature_map as fm
from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.formats.dictionary import save
from safedig_core.positions import parse

pytestmark = pytest.mark.comfy

FLUX_W, SD3_W = 64, 128
SCHEDULE = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # 4 steps


class SumSteerer:
    """Harmful mass = the sum of a token's features (a stand-in with a known answer)."""

    def __init__(self, gate_scale=1.0):
        self.gate_scale = gate_scale

    def harmful_mass(self, x):
        return x.sum(-1)


def call(rec, p, x, sigma, cond_or_uncond=(0, 1)):
    rec(p, x, {"sigmas": torch.tensor([sigma]), "sample_sigmas": SCHEDULE, "cond_or_uncond": list(cond_or_uncond)})


def test_recorder_averages_cond_rows_per_step_then_over_steps():
    p = parse("double.0.img")
    rec = fm.MassRecorder({p: SumSteerer()})
    cond, uncond = torch.full((1, 4, 2), 1.0), torch.full((1, 4, 2), 100.0)
    call(rec, p, torch.cat([cond, uncond]), 1.0)  # step 0: cond mass 2
    call(rec, p, torch.cat([cond * 3, uncond]), 0.75)  # step 1, two model calls (mass 6 and 10): mean 8
    call(rec, p, torch.cat([cond * 5, uncond]), 0.6)
    call(rec, p, uncond, 0.5, cond_or_uncond=(1,))  # an uncond-only call records nothing
    maps = rec.maps((2, 2))
    assert maps[p].shape == (1, 2, 2)
    assert torch.allclose(maps[p], torch.full((1, 2, 2), (2 + 8) / 2))
    with pytest.raises(fm.FeatureMapError, match=r"4 image tokens do not fill a 3×2 token grid"):
        rec.maps((3, 2))


def test_recorder_window_keeps_only_its_steps():
    p = parse("single.1.img")
    rec = fm.MassRecorder({p: SumSteerer()}, start=0.5, end=1.0)
    for i, sigma in enumerate(SCHEDULE[:-1].tolist()):
        call(rec, p, torch.full((2, 6, 3), float(i)), sigma)
    assert torch.allclose(rec.maps((2, 3))[p], torch.full((1, 2, 3), (2 + 3) * 3 / 2))  # steps 2 and 3


@pytest.fixture(scope="module")
def flux(comfy):
    return comfyui.tiny_flux(seed=1)


def conds(family):
    g = torch.Generator().manual_seed(0)
    pooled, extra = (768, {"guidance": 3.5}) if family == "flux" else (2048, {})
    pos = comfyui.conditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, pooled, generator=g), **extra)
    neg = comfyui.conditioning(torch.randn(1, 8, 64, generator=g) * 0.1, torch.zeros(1, pooled), **extra)
    return pos, neg


def maps_of(model, family, width, names, fire, latent, gate_scale=1.0):
    d = make_dictionary(family, width, names, fire=fire)
    steerers = {p: e.steerer() for p, e in d.entries.items()}
    for s in steerers.values():
        s.gate_scale = gate_scale
    pos, neg = conds(family)
    out, maps = fm.sample_maps(model, steerers, [parse(n) for n in names], pos, neg, {"samples": latent}, seed=0,
                               steps=2, cfg=2.0, sampler="euler", scheduler="simple")
    return out, maps


def test_flux_maps_have_the_token_grid_and_follow_the_harmful_latents(flux):
    names = ["double.0.img", "single.1.img"]
    latent = torch.zeros(2, 16, 8, 12)  # 64×96 pixels: a 4×6 grid of 2×2 latent patches
    out, firing = maps_of(flux, "flux", FLUX_W, names, True, latent)
    assert out["samples"].shape == latent.shape
    assert set(map(str, firing)) == set(names)
    for m in firing.values():
        assert m.shape == (2, 4, 6) and bool((m > 0).all())
    _, silent = maps_of(flux, "flux", FLUX_W, names, False, latent)
    assert all(torch.count_nonzero(m) == 0 for m in silent.values())
    _, scaled = maps_of(flux, "flux", FLUX_W, names, True, latent, gate_scale=4.0)
    for n in firing:  # maps are in gate units: mass / gate_scale
        assert torch.allclose(scaled[n] * 4.0, firing[n], rtol=1e-5)


def test_sd3_grid_and_text_positions_are_refused(flux, comfy):
    sd3 = comfyui.tiny_sd3(seed=2)
    _, maps = maps_of(sd3, "sd3", SD3_W, ["joint.0.img"], True, torch.zeros(1, 16, 8, 8))
    assert maps[parse("joint.0.img")].shape == (1, 4, 4)
    with pytest.raises(fm.FeatureMapError, match=r"double\.1\.txt: text-stream positions have no place"):
        maps_of(flux, "flux", FLUX_W, ["double.1.txt"], True, torch.zeros(1, 16, 8, 8))


def test_overlay_and_png():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    assert np.array_equal(fm.overlay(image, np.zeros((5, 7)), 1.0), image)  # zero mass: the image as it was
    hot = fm.overlay(image, np.full((5, 7), 3.0), 1.0)
    assert hot.shape == image.shape and not np.array_equal(hot, image)
    maps = {parse("double.0.img"): torch.rand(1, 5, 7) * 3, parse("single.0.img"): torch.zeros(1, 5, 7)}
    panels = fm.render(image, maps)
    assert len(panels) == 2 and panels[0].shape == panels[1].shape == (360, 340, 3)
    assert not np.array_equal(panels[0], panels[1])


def test_png_written_atomically(tmp_path):
    image = np.full((32, 32, 3), 128, np.uint8)
    panels = fm.render(image, {parse("double.0.img"): torch.ones(1, 4, 4), parse("double.1.img"): torch.ones(1, 4, 4)})
    path = fm.save_png(str(tmp_path / "maps.png"), panels)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (2 * 340, 360)
        im.verify()
    assert [p.name for p in tmp_path.iterdir()] == ["maps.png"]


def tiny_vae():
    """A random-weight TAESD with 16 latent channels: ComfyUI's smallest VAE (8× upscale), built in memory."""
    import comfy.sd
    import comfy.taesd.taesd

    m = comfy.taesd.taesd.TAESD(latent_channels=16)
    comfyui._init_weights(m, seed=0, std=0.1)  # ComfyUI's layers skip weight init
    return comfy.sd.VAE(sd=m.state_dict())


def test_feature_map_node_end_to_end(comfy, flux, tmp_path):
    path = tmp_path / "d.safetensors"
    save(make_dictionary("flux", FLUX_W, ["double.0.img", "double.1.txt", "single.1.img"]), str(path))
    loaded_cls = import_module(comfy.NODE_CLASS_MAPPINGS["SafeDIGLoadDictionary"].__module__).LoadedDictionary
    loaded = loaded_cls.from_file(str(path), "d.safetensors")
    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGFeatureMap"]
    pos, neg = conds("flux")
    args = {"model": flux, "dictionary": loaded, "positive": pos, "negative": neg,
            "latent_image": {"samples": torch.zeros(1, 16, 8, 8)}, "vae": tiny_vae(), "seed": 3, "steps": 2,
            "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple"}
    with torch.inference_mode():
        latent, image, heatmaps, summary = node.execute(**args, positions="all").result
    assert latent["samples"].shape == (1, 16, 8, 8)
    assert image.shape == (1, 64, 64, 3)
    assert heatmaps.shape == (2, 360, 340, 3) and float(heatmaps.min()) >= 0 and float(heatmaps.max()) <= 1
    assert summary.splitlines()[0].startswith("double.0.img:") and summary.splitlines()[1].startswith("single.1.img:")
    buf = io.BytesIO()
    Image.fromarray((heatmaps[0].numpy() * 255).astype(np.uint8)).save(buf, format="PNG")  # a valid picture
    with pytest.raises(ValueError, match=r"double\.1\.txt: text-stream"):
        node.execute(**args, positions="double.1.txt")
    with pytest.raises(ValueError, match=r"single\.0\.img .*not in the dictionary"):
        node.execute(**args, positions="single.0.img")
