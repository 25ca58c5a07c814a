"""SafeDIG Select Features in the real ComfyUI: Load → Select → Apply on a tiny FLUX; the steering follows the
selected latents, the input dictionary is never changed and the SAE weights are shared, not copied."""
from __future__ import annotations

from importlib import import_module

import pytest
import torch
from conftest import make_dictionary

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.formats.dictionary import save

pytestmark = pytest.mark.comfy

WIDTH = 64
SILENT, FIRING = [0, 1, 2], [40, 41]  # make_dictionary(fire=False) never fires 0..5; 40, 41 get a large bias below


@pytest.fixture(scope="module")
def flux(comfy):
    return comfyui.tiny_flux(seed=1)


def node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


def run(model, steps=2):
    g = torch.Generator().manual_seed(0)
    pos = comfyui.conditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, 768, generator=g), guidance=3.5)
    neg = comfyui.conditioning(torch.randn(1, 8, 64, generator=g) * 0.1, torch.zeros(1, 768), guidance=3.5)
    return comfyui.sample(model, pos, neg, torch.zeros(1, 16, 8, 8), seed=0, steps=steps, cfg=2.0)


@pytest.fixture
def loaded(comfy, tmp_path):
    """A dictionary (as the Load node gives it) whose marked harmful latents never fire, while 40 and 41 always do."""
    d = make_dictionary("flux", WIDTH, ["double.0.img", "single.0.img"], latents=96, k=8, fire=False)
    for e in d.entries.values():
        with torch.no_grad():
            e.sae.b_enc[FIRING] = 50.0
    save(d, str(tmp_path / "d.safetensors"))
    mod = import_module(node(comfy, "SafeDIGLoadDictionary").__module__)  # the pack's own copy of its classes
    return mod.LoadedDictionary.from_file(str(tmp_path / "d.safetensors"), "d.safetensors")


def select(comfy, loaded, position, latents, mode="replace"):
    return node(comfy, "SafeDIGSelectFeatures").execute(dictionary=loaded, position=position, latents=latents,
                                                         mode=mode).result[0]


def apply(comfy, model, loaded):
    return node(comfy, "SafeDIGApplySteering").execute(
        model=model, dictionary=loaded, blend=1.0, repel=1.0, threshold=0.0, start_percent=0.0, end_percent=1.0,
        apply_to="both", positions="all", preserve_norm=False).result[0]


def test_steering_follows_the_selected_latents(comfy, flux, loaded):
    base = run(flux)
    assert torch.equal(run(apply(comfy, flux, loaded)), base)  # the file's own (silent) latents: no effect
    chosen = select(comfy, loaded, "double.0.img", "40, 41")
    steered = run(apply(comfy, flux, chosen))
    assert not torch.equal(steered, base)
    one = select(comfy, loaded, "double.0.img", "41")
    assert not torch.equal(run(apply(comfy, flux, one)), base) and not torch.equal(run(apply(comfy, flux, one)), steered)
    back = select(comfy, chosen, "double.0.img", "40,41", mode="remove")
    assert {str(p): e.harmful for p, e in back.dictionary.entries.items()} == {"double.0.img": [],
                                                                              "single.0.img": SILENT + [3, 4, 5]}
    assert torch.equal(run(apply(comfy, flux, back)), base)
    other = select(comfy, loaded, "single.0.img", "40", mode="add")
    assert not torch.equal(run(apply(comfy, flux, other)), base)
    assert torch.equal(run(apply(comfy, flux, loaded)), base)  # the input dictionary still steers as before


def test_input_is_not_changed_and_weights_are_shared(comfy, loaded):
    d = loaded.dictionary
    (p0, p1) = d.positions
    before = {p: (list(e.harmful), list(e.scores)) for p, e in d.entries.items()}
    steerers = dict(loaded.store.steerers)
    new = select(comfy, loaded, str(p0), "7,40", mode="add")
    assert new is not loaded and new.dictionary is not d and new.store is not loaded.store
    assert {p: (e.harmful, e.scores) for p, e in d.entries.items()} == before
    assert loaded.store.steerers == steerers and loaded.store.steerers[p0].harmful.tolist() == before[p0][0]
    e = new.dictionary.entries[p0]
    assert e.harmful == before[p0][0] + [7, 40] and e.scores == before[p0][1] + [1.0, 1.0]
    assert e.sae is d.entries[p0].sae  # the same module: no copy of the weights
    assert new.store.steerers[p0].sae.W_enc.data_ptr() == d.entries[p0].sae.W_enc.data_ptr()
    assert new.store.steerers[p1] is loaded.store.steerers[p1]  # untouched positions share their steerer
    assert new.store.steerers[p0].harmful.tolist() == [0, 1, 2, 3, 4, 5, 7, 40]
    removed = select(comfy, new, str(p0), "0, 40", mode="remove")
    assert removed.dictionary.entries[p0].harmful == [1, 2, 3, 4, 5, 7]
    assert select(comfy, new, str(p0), "", mode="replace").dictionary.entries[p0].harmful == []


def test_bad_selection_is_one_clear_error(comfy, loaded):
    with pytest.raises(ValueError, match=r"latent 96 is out of range for position double\.0\.img, whose SAE has 96"):
        select(comfy, loaded, "double.0.img", "3, 96")
    with pytest.raises(ValueError, match=r"'x1' is not a latent index"):
        select(comfy, loaded, "double.0.img", "3, x1")
    with pytest.raises(ValueError, match=r"double\.1\.img .*not in the dictionary"):
        select(comfy, loaded, "double.1.img", "3")
    with pytest.raises(ValueError, match=r"exactly one of the dictionary's positions"):
        select(comfy, loaded, "double.0.img,single.0.img", "3")
