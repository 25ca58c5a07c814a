"""The fast gate (`safedig_core/fast_gate.py`) decides as the exact gate does: its screen's bound is never
below the harmful mass the exact encode computes (in float64, float32 and bfloat16), so the tokens it gates,
the images it flags and the steered outputs are the exact gate's; and it does skip tokens."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from safedig_core import fast_gate
from safedig_core.sae import SparseAutoencoder
from safedig_core.steering import PositionSteerer, SteeringConfig


def setup(seed, d, latents, k, h, bias=0.0, planted=0.3, strength=6.0, batch=2, tokens=64):
    """A random TopK SAE, `h` harmful latents, and tokens with harmful decoder rows written into a fraction."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder.init_random(d, latents, k, generator=g)
    H = torch.randperm(latents, generator=g)[:h]
    with torch.no_grad():
        sae.b_enc[H] = bias
    x = torch.randn(batch, tokens, d, generator=g)
    mark = torch.rand(batch, tokens, generator=g) < planted
    pick = torch.randint(0, h, (batch, tokens), generator=g)
    x = x + strength * mark.unsqueeze(-1) * sae.W_dec.detach()[H][pick]
    return sae, H, x


def exact_mass(steerer, x):
    return steerer.harmful_mass(x).reshape(-1).double()


sizes = dict(seed=st.integers(0, 10_000), d=st.sampled_from([16, 48]), latents=st.sampled_from([64, 300]),
             k=st.sampled_from([1, 8, 24]), h=st.integers(1, 12), probes=st.sampled_from([0, 5, 40, 10_000]))


@settings(max_examples=40, deadline=None)
@given(**sizes, dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       bias=st.sampled_from([-2.0, 0.0, 1.0]))
def test_bound_is_never_below_exact_mass(seed, d, latents, k, h, probes, dtype, bias):
    sae, H, x = setup(seed, d, latents, k, h, bias)
    steerer = PositionSteerer(sae, H).to("cpu", dtype)
    work = steerer._derived(torch.device("cpu"), dtype)[0]
    x = x.to(dtype)
    bound = fast_gate.Screen(work, steerer.harmful, probes).bound(work.prepare(x.reshape(-1, d)), work.b_dec)
    assert (bound.double() >= exact_mass(steerer, x)).all()


def no_near_tie(steerer, x, floor):
    """No token's mass within rounding of `floor` (a mass of exactly 0, no harmful code at all, is no tie)."""
    m = exact_mass(steerer, x)
    m = m[m != 0]
    return not bool(((m - floor).abs() <= 1e-9 * max(floor, 1.0)).any())


@settings(max_examples=40, deadline=None)
@given(**sizes, threshold=st.floats(0.0, 8.0), blend=st.sampled_from([0.0, 1.0]), repel=st.sampled_from([0.5, 1.0]),
       gate=st.sampled_from(["token", "image"]), cond_only=st.booleans(), refine=st.sampled_from([None, 0, 50]))
def test_fast_gate_steers_as_exact_gate(seed, d, latents, k, h, probes, threshold, blend, repel, gate, cond_only,
                                        refine):
    sae, H, x = setup(seed, d, latents, k, h)
    x = x.double()
    steerer = PositionSteerer(sae, H, gate_scale=1.5, image_gate_scale=2.0).to("cpu", torch.float64)
    assume(no_near_tie(steerer, x, threshold * 1.5) and no_near_tie(steerer, x, threshold * 2.0))
    assume(no_near_tie(steerer, x, 0.0))  # the floor of a flagged image's tokens
    cfg = SteeringConfig(blend=blend, repel=repel, threshold=threshold, gate=gate)
    rows = torch.tensor([True, False]) if cond_only else None
    old = fast_gate.PROBES, fast_gate.REFINE
    try:
        # the decision must not depend on how many probes screen, nor on the second screen
        fast_gate.PROBES, fast_gate.REFINE = probes, refine
        fast = steerer.steer(x, cfg.with_(fast_gate=True), rows)
        if gate == "image":
            for halves in (None, [0, 1], [1, 0], [1, 1]):  # each row an image; an image's cond and uncond rows
                assert torch.equal(steerer.flag_images(x, cfg.with_(fast_gate=True), halves),
                                   steerer.flag_images(x, cfg, halves))
    finally:
        fast_gate.PROBES, fast_gate.REFINE = old
    exact = steerer.steer(x, cfg, rows)
    assert torch.equal((fast != x).any(-1), (exact != x).any(-1))
    torch.testing.assert_close(fast, exact, rtol=1e-9, atol=1e-9)


def test_screen_skips_safe_tokens_and_keeps_planted_ones():
    """Harmful latents biased off: the screen lets no unplanted token through, and every planted one."""
    sae, H, x = setup(1, 64, 1024, 16, 8, bias=-4.0, planted=0.2, strength=12.0, tokens=256)
    steerer = PositionSteerer(sae, H).to("cpu", torch.float32)
    work = steerer._derived(torch.device("cpu"), torch.float32)[0]
    flat = x.reshape(-1, 64)
    passes = fast_gate.screen(work, steerer.harmful).may_pass(work.prepare(flat), work.b_dec, 2.0)
    mass = exact_mass(steerer, x)
    assert passes[mass > 2.0].all()
    assert 0 < passes.float().mean() < 0.5
    cfg = SteeringConfig(repel=1.0, threshold=2.0)
    assert torch.equal(steerer.steer(x, cfg.with_(fast_gate=True)), steerer.steer(x, cfg))


def test_each_stage_only_narrows_the_one_before_and_reuses_its_products():
    """The cascade: the harmful rows alone, the probes, then more probes gathered from the encoder at each call.
    Each stage's rows begin with the previous stage's, its pre-activations (the previous ones extended by the rows
    it adds) are the product with all its rows, its bound is an upper bound, and the cascade lets through fewer
    tokens than its first stages alone, never one with mass above the floor."""
    sae, H, x = setup(3, 48, 1200, 16, 8, bias=-1.0, planted=0.2, strength=8.0, tokens=256)
    steerer = PositionSteerer(sae, H).to("cpu", torch.float32)
    work = steerer._derived(torch.device("cpu"), torch.float32)[0]
    xs = work.prepare(x.reshape(-1, 48))
    stages = fast_gate.screen(work, steerer.harmful).stages()
    assert [s.m for s in stages] == [0, fast_gate.default_probes(work), fast_gate.default_refine(work)]
    assert stages[-1].W is None and stages[1].W is not None  # the last stage gathers its rows, the others keep them
    mass = exact_mass(steerer, x)
    for i, stage in enumerate(stages):
        assert torch.equal(stage.rows[:len(H)], steerer.harmful) and len(set(stage.rows.tolist())) == len(stage.rows)
        if i:
            assert torch.equal(stage.rows[:len(stages[i - 1].rows)], stages[i - 1].rows)
        xc = stage.centred(xs, work.b_dec)
        direct = torch.addmm(work.b_enc[stage.rows], xc, work.W_enc[stage.rows].t())
        torch.testing.assert_close(stage.extend(xc), direct, rtol=0, atol=1e-5)
        assert (stage.bound(xs, work.b_dec).double() >= mass).all()
    cascade = fast_gate.screen(work, steerer.harmful).may_pass(xs, work.b_dec, 1.0)
    harmful_only = fast_gate.Screen(work, steerer.harmful, 0).may_pass(xs, work.b_dec, 1.0)
    first_two = fast_gate.Screen(work, steerer.harmful, stages[1].m).may_pass(xs, work.b_dec, 1.0)
    assert cascade[mass > 1.0].all()
    assert not (cascade & ~first_two).any() and not (first_two & ~harmful_only).any()
    assert cascade.sum() < first_two.sum() < harmful_only.sum()


def test_screen_follows_in_place_changes():
    sae, H, _ = setup(2, 16, 64, 4, 3)
    first = fast_gate.screen(sae, H)
    assert fast_gate.screen(sae, H) is first
    with torch.no_grad():
        sae.W_enc[H[0]] *= 2
    second = fast_gate.screen(sae, H)
    assert second is not first
    sae.to(torch.float64)  # moved in place, as ComfyUI moves a module: the screen follows
    assert fast_gate.screen(sae, H) is not second and fast_gate.screen(sae, H).W.dtype == torch.float64


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_other_activations_keep_their_exact_path(activation):
    """ReLU / JumpReLU gates already read only the harmful rows: fast_gate changes nothing there."""
    topk, H, x = setup(3, 16, 64, 8, 4)
    sae = SparseAutoencoder(16, 64, 8, activation)
    with torch.no_grad():
        sae.W_enc.copy_(topk.W_enc)
        sae.W_dec.copy_(topk.W_dec)
    steerer = PositionSteerer(sae, H)
    cfg = SteeringConfig(repel=1.0, threshold=0.5)
    assert torch.equal(steerer.steer(x, cfg.with_(fast_gate=True)), steerer.steer(x, cfg))
