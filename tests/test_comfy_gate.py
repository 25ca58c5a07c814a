"""The per-image gate in the real ComfyUI runtime: tiny FLUX and SD3, real KSampler runs under
torch.inference_mode() (as ComfyUI's executor runs nodes), the Apply Steering node's own inputs.

Which images the detector flags is set exactly: the detecting position's SAE reads one channel
(its harmful latents fire only when channel 0 exceeds 10), and a foreign block patch at the detector's
block lifts that channel for chosen rows of each model call. So every assertion is structural: the rows
each acting position steered are exactly the rows flagged in the same call.
"""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_dictionary
from test_comfy_steering import conds, load

from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.sae import SparseAutoencoder

pytestmark = pytest.mark.comfy

WIDTH = {"flux": 64, "sd3": 128}
DETECTOR = {"flux": "double.0.txt", "sd3": "joint.0.txt"}
ACTING = {"flux": ["double.0.img", "double.1.img", "double.1.txt", "single.0.txt", "single.1.img"],
          "sd3": ["joint.0.img", "joint.1.img"]}
SLOT = {"flux": ("double_block", 0), "sd3": ("double_block", 0)}
COND, UNCOND = 0, 1


@pytest.fixture(scope="module")
def models(comfy):
    return {"flux": comfyui.tiny_flux(seed=1), "sd3": comfyui.tiny_sd3(seed=2)}


def reader(width: int, harmful: int = 6) -> SparseAutoencoder:
    """A ReLU SAE whose harmful latents read channel 0 above 10 (the tiny models keep every activation below 2)."""
    g = torch.Generator().manual_seed(7)
    sae = SparseAutoencoder.init_random(width, 96, 8, generator=g)
    relu = SparseAutoencoder(width, 96, 8, "relu")
    with torch.no_grad():
        relu.W_enc.copy_(sae.W_enc)
        relu.W_dec.copy_(sae.W_dec)
        relu.b_enc.fill_(-1e4)
        relu.W_enc[:harmful] = 0.0
        relu.W_enc[:harmful, 0] = 1.0
        relu.b_enc[:harmful] = -10.0
    return relu.requires_grad_(False)


def dictionary(family, own_unit=1e9, detector_fires=True):
    """Acting positions whose harmful latents fire on every token (bias 50), but whose own per-image unit is
    `own_unit` (huge: they never flag an image themselves), and the channel-reading detector."""
    d = make_dictionary(family, WIDTH[family], ACTING[family] + [DETECTOR[family]])
    for e in d.entries.values():
        e.image_gate_scale = own_unit
    det = d.entries[next(p for p in d.entries if str(p) == DETECTOR[family])]
    det.sae = reader(WIDTH[family]) if detector_fires else reader(WIDTH[family], harmful=0)
    det.image_gate_scale = 1.0
    return d


def rows_of(cond_or_uncond, batch, marked):
    """[B] bool: the rows of one model call whose (half, image index) is in `marked`."""
    per = batch // len(cond_or_uncond)
    return torch.tensor([(c, i) in marked for c in cond_or_uncond for i in range(per)])


class Marker:
    """A foreign patch at the detector's block: lifts channel 0 of the text stream for the `marked`
    (half, image) rows, and logs the mask of each call."""

    def __init__(self, marked, log):
        self.marked, self.log = marked, log

    def __call__(self, args, extra):
        out = dict(extra["original_block"](args))
        to = args["transformer_options"]
        mask = rows_of(to["cond_or_uncond"], out["txt"].shape[0], self.marked)
        txt = out["txt"].clone()
        txt[mask, :, 0] += 20.0
        out["txt"] = txt
        self.log.append(("mark", mask, list(to["cond_or_uncond"])))
        return out

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies its patches: keep logging to the same list
        return self


def flagged_rows(mask, cond_or_uncond):
    """The rows the per-image gate must flag for a marked-row mask: every row of each image whose cond row is
    marked (an uncond row, the negative prompt, never decides)."""
    per = len(mask) // len(cond_or_uncond)
    images = torch.zeros(per, dtype=torch.bool)
    for j, c in enumerate(cond_or_uncond):
        if c == COND:
            images |= mask[j * per:(j + 1) * per]
    return images.repeat(len(cond_or_uncond))


def spy(store, log, tag=""):
    """Wrap each steerer's steer to log (position, flagged, rows, which rows changed)."""
    for p, st in store.steerers.items():
        orig = st.steer

        def rec(x, cfg, rows=None, flagged=None, _p=p, _orig=orig):
            out = _orig(x, cfg, rows, flagged=flagged)
            changed = (out != x).flatten(1).any(1)
            log.append(("steer", tag + str(_p), flagged, rows, changed))
            return out

        st.steer = rec


def marked_model(models, family, marked, log):
    m = models[family].clone()
    m.set_model_patch_replace(Marker(marked, log), "dit", *SLOT[family])
    return m


def apply(comfy, model, loaded, **kw):
    node = comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"]
    args = dict(blend=1.0, repel=1.0, threshold=1.0, start_percent=0.0, end_percent=1.0, apply_to="both",
                positions="all", preserve_norm=False, gate="per image", detect_at="text positions")
    args.update(kw)
    with torch.inference_mode():
        return node.execute(model=model, dictionary=loaded, **args).result[0]


def run(model, family, steps=2):
    pos, neg = conds(family)
    with torch.inference_mode():
        return comfyui.sample(model, pos, neg, torch.zeros(2, 16, 8, 8), seed=0, steps=steps, cfg=2.0)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_text_decision_reaches_every_block_of_the_call_per_image_and_half(comfy, models, tmp_path, family):
    log = []
    marked = {(COND, 0), (UNCOND, 1)}
    loaded = load(comfy, tmp_path, dictionary(family), f"{family}.safetensors")
    spy(loaded.store, log)
    acting = ACTING[family] + [DETECTOR[family]]
    for apply_to, halves in (("both", (COND, UNCOND)), ("cond", (COND,))):
        log.clear()
        run(apply(comfy, marked_model(models, family, marked, log), loaded, apply_to=apply_to), family)
        mask, seen = None, []
        for event in log:
            if event[0] == "mark":
                raw, mask = event[1], flagged_rows(event[1], event[2])
                continue
            _, p, flagged, rows, changed = event
            seen.append(p)
            assert torch.equal(flagged, mask), (p, flagged, mask)  # the detector's decision of this same call
            allowed = mask if rows is None else mask & rows
            if p == DETECTOR[family]:  # its harmful latents fire only on the marked rows' tokens
                allowed = allowed & raw
            assert torch.equal(changed, allowed), (p, apply_to, changed, allowed)
            if p != DETECTOR[family]:
                assert int(allowed.sum()) == len(halves)  # image 0 (its cond row is marked) in each steered half
        assert sorted(seen) == sorted(acting * 2)  # every acting position, each of the two model calls


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_decision_made_elsewhere_and_unflagged_images_keep_every_bit(comfy, models, tmp_path, family):
    log = []
    everything = {(h, i) for h in (COND, UNCOND) for i in (0, 1)}
    base = run(marked_model(models, family, everything, log), family)
    loaded = load(comfy, tmp_path, dictionary(family), f"{family}.safetensors")
    steered = apply(comfy, marked_model(models, family, everything, log), loaded)
    assert not torch.equal(run(steered, family), base)
    # deciding for themselves, the acting positions never flag an image (their unit is huge), though every
    # token fires there
    each = apply(comfy, marked_model(models, family, everything, log), loaded, detect_at="each position",
                 positions=",".join(ACTING[family]))
    assert torch.equal(run(each, family), base)
    # nothing marked: the detector flags no image, and nothing changes anywhere
    quiet = run(models[family], family)
    assert torch.equal(run(apply(comfy, models[family], loaded), family), quiet)
    # zero strength under the per-image gate: bit for bit, however the images are flagged
    zero = apply(comfy, marked_model(models, family, everything, log), loaded, blend=0.0, repel=0.0)
    assert torch.equal(run(zero, family), base)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_risky_negative_prompt_never_opens_the_gate(comfy, models, tmp_path, family):
    """Only uncond rows fire: nothing is flagged, nothing changes; a cond row firing flags its whole image."""
    log = []
    loaded = load(comfy, tmp_path, dictionary(family), f"{family}.safetensors")
    negative_only = {(UNCOND, 0), (UNCOND, 1)}
    base = run(marked_model(models, family, negative_only, log), family)
    for detect_at in ("text positions", "each position"):
        kw = {} if detect_at == "text positions" else {"positions": DETECTOR[family]}
        steered = apply(comfy, marked_model(models, family, negative_only, log), loaded, detect_at=detect_at, **kw)
        assert torch.equal(run(steered, family), base), detect_at
    spy(loaded.store, log)
    log.clear()
    run(apply(comfy, marked_model(models, family, {(COND, 1)}, log), loaded), family)
    steers = [e for e in log if e[0] == "steer"]
    assert steers and all(torch.equal(e[2], torch.tensor([False, True, False, True])) for e in steers)


def test_chained_nodes_decide_apart_and_the_foreign_patch_keeps_working(comfy, models, tmp_path):
    family, log = "flux", []
    first = load(comfy, tmp_path, dictionary(family), "first.safetensors")
    second = load(comfy, tmp_path, dictionary(family, detector_fires=False), "second.safetensors")
    spy(first.store, log, "first:")
    spy(second.store, log, "second:")
    chained = apply(comfy, apply(comfy, marked_model(models, family, {(COND, 0)}, log), first), second)
    run(chained, family)
    marks = [e for e in log if e[0] == "mark"]
    steers = [e for e in log if e[0] == "steer"]
    assert len(marks) == 2 and all(int(m[1].sum()) == 1 for m in marks)  # the foreign patch ran every call
    expected = flagged_rows(marks[0][1], marks[0][2])  # image 0, both its halves
    # the second node's silent detector flags nothing, so its positions never steer, although the first
    # node's detector flagged an image in the same model call
    assert sorted(e[1] for e in steers) == sorted(f"first:{p}" for p in (ACTING[family] + [DETECTOR[family]]) * 2)
    for _, p, flagged, _, changed in steers:
        fired = expected & marks[0][1] if p == f"first:{DETECTOR[family]}" else expected  # the detector reads marks
        assert torch.equal(flagged, expected) and torch.equal(changed, fired), p


def test_positions_before_every_detector_are_refused(comfy, models, tmp_path):
    loaded = load(comfy, tmp_path, dictionary("flux"), "flux.safetensors")
    with pytest.raises(ValueError, match=r"double\.0\.img runs before every detecting position \(single\.0\.txt\)"):
        apply(comfy, models["flux"], loaded, positions="double.0.img, single.0.txt")
    with pytest.raises(ValueError, match="none of the steered positions"):
        apply(comfy, models["flux"], loaded, positions="double.0.img, single.1.img")
    # the per-token gate ignores detect_at, as its tooltip says
    apply(comfy, models["flux"], loaded, positions="double.0.img, single.1.img", gate="per token")


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_focus_steers_only_the_tokens_near_each_flagged_rows_strongest(comfy, models, tmp_path, family):
    """The node's focus input: at focus 1 a flagged row of an acting position changes at its strongest token(s)
    only; at 0 at every token with harmful activity (all of them here); unflagged rows keep every bit."""
    loaded = load(comfy, tmp_path, dictionary(family), f"{family}.safetensors")
    counts = {}
    for p, st in loaded.store.steerers.items():
        orig = st.steer

        def rec(x, cfg, rows=None, flagged=None, _p=p, _orig=orig):
            out = _orig(x, cfg, rows, flagged=flagged)
            if str(_p) != DETECTOR[family]:
                per_row = (out != x).any(-1).sum(-1)  # changed tokens of each batch row
                counts.setdefault(cfg.focus, []).append((per_row, flagged, x.shape[1]))
            return out

        st.steer = rec
    for focus in (0.0, 1.0):
        run(apply(comfy, marked_model(models, family, {(COND, 0)}, []), loaded, focus=focus), family)
    assert set(counts) == {0.0, 1.0}  # both runs steered at the acting positions
    for focus, calls in counts.items():
        for per_row, flagged, tokens in calls:
            assert torch.equal(per_row[~flagged], torch.zeros_like(per_row[~flagged]))
            want = torch.full_like(per_row[flagged], tokens) if focus == 0.0 else torch.ones_like(per_row[flagged])
            assert torch.equal(per_row[flagged], want), (focus, per_row, flagged)
    # the per-token gate has no image to focus in: the node drops focus there
    config = sys.modules[comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"].__module__].config
    assert config(1.0, 1.0, 1.0, 0.0, 1.0, "both", False, "per token", "each position", False, 0.7).focus == 0.0
    assert config(1.0, 1.0, 1.0, 0.0, 1.0, "both", False, "per image", "text positions", False, 0.7).focus == 0.7
