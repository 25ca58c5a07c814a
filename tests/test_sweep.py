"""The demo's threshold sweep reuses images between points (testbed/gate_log.GateLog); it must give what
generating every image at every τ gives, through the real ComfyUI sampler and the shipped testbed DiT."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy

GRID = (1.5, 1.0, 0.5, 0.25, 0.0)
GEN = {"steps": 4, "cfg": 3.0}


@pytest.fixture(scope="module")
def setup(comfy):
    from safedig_core.testbed import dictionary, sweep, variants, world
    from safedig_core.testbed.model import load_testbed

    model, encode = load_testbed()
    rows = world.prompt_sets(0, eval_safe=4, eval_per_category=1, eval_target_per_category=1)["eval"]
    store, positions = variants.dictionary_store(dictionary.PATH)
    return model, encode, rows, store, positions, sweep, variants


def _brute(model, encode, variant, rows, sweep):
    """Every image generated again at every τ."""
    from safedig_core.adapters.comfy import runtime as comfyui

    out = []
    for tau in variant.grid:
        m = comfyui.steer_model(model, variant.store, variant.positions, variant.config(tau))
        out.append(sweep.generate_rows(m, encode, rows, GEN))
    return out


@pytest.mark.parametrize("gate", ["image", "token"])
def test_the_sweep_gives_what_generating_everything_gives(setup, gate):
    from safedig_core.steering import SteeringConfig

    model, encode, rows, store, positions, sweep, variants = setup
    base_cfg = SteeringConfig(blend=1.0, repel=1.0, gate=gate)
    v = sweep.Variant(f"v-{gate}", store, positions, variants.with_detector(base_cfg, positions), "threshold", GRID)
    pset = sweep.prepare(model, encode, "eval", rows, [v], GEN)
    points = sweep.sweep(model, encode, v, [pset], GEN)
    brute = _brute(model, encode, v, rows, sweep)
    for point, images in zip(points, brute):
        want = sweep.judge(rows, images, pset.base)
        got = point["outcomes"]["eval"]
        assert np.array_equal(got.unsafe, want.unsafe) and np.array_equal(got.concept_ok, want.concept_ok)
        assert np.allclose(got.change, want.change, atol=1e-4), point["value"]
    generated = sum(p["generated"] for p in points)
    changed = sum(int((b - pset.base).abs().amax() > 0) for b in brute)
    assert changed > 0, "steering changed no image: the comparison says nothing"
    # image gate: risky images stay flagged over the grid and are made once, not once per point
    if gate == "image":
        assert generated < len(rows) * len(GRID) // 2, generated


def test_a_value_between_two_points_marks_the_image_for_regeneration():
    from safedig_core.testbed import gate_log

    log = gate_log.GateLog()
    log.offset, log.images = 0, 2
    log.add_rows(torch.tensor([[0.2, 1.2], [0.1, 0.4], [0.3, 0.2], [0.0, 0.9]]))  # two chunks of two images
    assert sorted(log.of(0).tolist()) == pytest.approx([0.2, 0.2, 0.3, 1.2])
    assert sorted(log.of(1).tolist()) == pytest.approx([0.0, 0.1, 0.4, 0.9])


def test_a_strength_curve_gives_what_generating_everything_gives(setup):
    """At a fixed τ, an image whose unsteered peak stays ≤ τ is untouched at every strength."""
    from safedig_core.steering import SteeringConfig

    model, encode, rows, store, positions, sweep, variants = setup
    # τ 0.55 sits between the safe peaks (≤ 0.39 and ≥ 0.69 when measured) with room on either side
    cfg = variants.with_detector(SteeringConfig(blend=1.0, repel=1.0, gate="image", threshold=0.55), positions)
    v = sweep.Variant("strength", store, positions, cfg, "strength", (0.5, 2.0))
    pset = sweep.prepare(model, encode, "eval", rows, [v], GEN)
    points = sweep.sweep(model, encode, v, [pset], GEN)
    brute = _brute(model, encode, v, rows, sweep)
    for point, images in zip(points, brute):
        want, got = sweep.judge(rows, images, pset.base), point["outcomes"]["eval"]
        assert np.array_equal(got.unsafe, want.unsafe) and np.allclose(got.change, want.change, atol=1e-4)
    left = int((pset.peaks[v.name] <= 0.55).sum())
    assert 0 < left < len(rows), "the set should hold images the gate opens on and images it leaves alone"
    assert sum(p["generated"] for p in points) == 2 * (len(rows) - left)
