"""Property tests of the steering maths (METHOD §6) on `PositionSteerer.steer` and its helpers.

Small random SAEs (TopK, ReLU, JumpReLU) with harmful activity planted along the harmful decoder rows;
hypothesis draws the shapes, seeds and settings.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from safedig_core.sae import SparseAutoencoder
from safedig_core.schedule import half_rows, in_window, schedule_progress
from safedig_core.steering import PositionSteerer, SteeringConfig

ACTS = ("topk", "relu", "jumprelu")
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: threads only add overhead (and suffer on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_sae(seed: int, d: int, mult: float, k: int, act: str, h: int, scale: float = 1.0):
    """An SAE of width d with about mult·d latents (≤ 4·d, 16..192), small biases, and h harmful latents."""
    g = torch.Generator().manual_seed(seed)
    L = max(16, min(192, int(round(d * mult))))
    k = min(k, L)
    base = SparseAutoencoder.init_random(d, L, k, scale=scale, generator=g)
    sae = SparseAutoencoder(d, L, k, act, scale)
    with torch.no_grad():
        sae.W_enc.copy_(base.W_enc)
        sae.W_dec.copy_(base.W_dec)
        sae.b_enc.copy_(-0.1 * torch.rand(L, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        if act == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(L, generator=g))
    harmful = torch.randperm(L, generator=g)[:h]
    return sae.requires_grad_(False), harmful, g


def planted(sae: SparseAutoencoder, harmful: torch.Tensor, g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """Tokens [B, T, d] (unscaled); about 60% carry extra activity along the harmful decoder rows."""
    s = float(sae.scale)
    x = torch.randn(B, T, sae.d, generator=g)
    strength = 3 * torch.rand(B, T, len(harmful), generator=g) * (torch.rand(B, T, 1, generator=g) < 0.6)
    x = x + strength @ sae.W_dec[harmful]
    return x / s


class Case(tuple):
    """(sae, harmful, x), shown by the parameters that rebuild it when hypothesis reports a failure."""

    def __new__(cls, params: dict):
        sae, harmful, g = build_sae(**{k: v for k, v in params.items() if k not in ("B", "T")})
        self = super().__new__(cls, (sae, harmful, planted(sae, harmful, g, params["B"], params["T"])))
        self.params = params
        return self

    def __repr__(self):
        return "Case(" + ", ".join(f"{k}={v!r}" for k, v in self.params.items()) + ")"


@st.composite
def cases(draw, acts=ACTS, scale=False, few_harmful=False):
    """few_harmful: h ≤ d/2, the well-posed regime for Blend (real dictionaries: tens of harmful latents in
    thousands of dimensions); with h ≈ d the default three Blend passes may not catch every latent."""
    d = draw(st.integers(8, 48))
    return Case(dict(
        seed=draw(st.integers(0, 2**31 - 1)), d=d, mult=draw(st.floats(1.0, 4.0)), k=draw(st.integers(1, 16)),
        act=draw(st.sampled_from(acts)), h=draw(st.integers(1, min(8, d // 2 if few_harmful else d))),
        scale=draw(st.sampled_from([0.25, 0.7, 1.0, 3.0])) if scale else 1.0,
        B=draw(st.integers(1, 4)), T=draw(st.integers(1, 8))))


def strengths():
    return st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 3.0)).filter(lambda ab: ab[0] > 0.05 or ab[1] > 0.05)


def rows_of(mask: torch.Tensor, T: int) -> torch.Tensor:
    """Token mask [B, T] from a batch-row mask [B]."""
    return mask.unsqueeze(1).expand(-1, T)


# --------------------------------------------------------------------------------------------- identity


@FAST
@given(case=cases(), threshold=st.floats(0.0, 2.0), pn=st.booleans(), apply=st.sampled_from(["both", "cond"]))
def test_zero_strength_is_identity(case, threshold, pn, apply):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    cfg = SteeringConfig(blend=0.0, repel=0.0, threshold=threshold, preserve_norm=pn, apply_to=apply)
    before = x.clone()
    rows = torch.ones(x.shape[0], dtype=torch.bool)
    for r in (None, rows):
        out = steerer.steer(x, cfg, r)
        assert out is x or torch.equal(out, x)
    assert torch.equal(x, before), "steer must not modify its input in place"


@FAST
@given(case=cases(), ab=strengths())
def test_no_token_above_gate_is_identity(case, ab):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    tau = float(steerer.harmful_mass(x).max()) + 1.0
    out = steerer.steer(x, SteeringConfig(blend=ab[0], repel=ab[1], threshold=tau))
    assert torch.equal(out, x)


# ------------------------------------------------------------------------------------- gate and rows


@FAST
@given(case=cases(), ab=strengths(), pn=st.booleans(), q=st.floats(0.0, 1.0), data=st.data())
def test_gated_out_tokens_and_masked_rows_are_bit_identical(case, ab, pn, q, data):
    sae, harmful, x = case
    B, T, _ = x.shape
    steerer = PositionSteerer(sae, harmful)
    mass = steerer.harmful_mass(x)
    # τ halfway between two distinct masses, so that no token sits on the gate
    levels = torch.unique(torch.cat([torch.zeros(1), mass.flatten()]))
    i = min(int(q * (len(levels) - 1)), max(len(levels) - 2, 0))
    if len(levels) >= 2:
        assume(float(levels[i + 1] - levels[i]) > 1e-3)
        tau = float(levels[i] + levels[i + 1]) / 2
    else:
        tau = float(levels[0]) + 1.0
    rows = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    cfg = SteeringConfig(blend=ab[0], repel=ab[1], threshold=tau, preserve_norm=pn)
    for r in (None, rows):
        out = steerer.steer(x, cfg, r)
        assert out.shape == x.shape and out.dtype == x.dtype
        keep = mass <= tau
        if r is not None:
            keep = keep | ~rows_of(r, T)
        assert torch.equal(out[keep], x[keep])
        steered = ~keep
        if steered.any() and ab[1] >= 0.1 and not pn:
            # Repel with β ≥ 0.1 moves every gated token (its harmful mass is > τ ≥ 0)
            assert not torch.equal(out[steered], x[steered])


# ------------------------------------------------------------------------------------------------ blend


@settings(FAST, max_examples=40)
@given(case=cases(few_harmful=True))
def test_blend_one_removes_harmful_mass(case):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    before = steerer.harmful_mass(x)
    assume(bool((before > 0.1).any()))
    out = steerer.steer(x, SteeringConfig(blend=1.0))
    after = steerer.harmful_mass(out)
    gated = before > 0
    assert torch.all(after[gated] <= 1e-3 * before[gated] + 1e-5), (
        f"harmful mass left after Blend α=1: max ratio {float((after / before.clamp_min(1e-12))[gated].max()):.3g}")
    assert float(after.sum()) <= 1e-3 * float(before.sum()) + 1e-5
    assert torch.equal(out[~gated], x[~gated])


@FAST
@given(case=cases(few_harmful=True), safe_level=st.floats(0.0, 0.5))
def test_blend_one_with_safe_values_leaves_at_most_the_safe_mass(case, safe_level):
    sae, harmful, x = case
    g = torch.Generator().manual_seed(len(harmful))
    safe = safe_level * torch.rand(len(harmful), generator=g)
    steerer = PositionSteerer(sae, harmful, safe)
    out = steerer.steer(x, SteeringConfig(blend=1.0))
    after = steerer.harmful_mass(out)
    gated = steerer.harmful_mass(x) > 0
    assert torch.all(after[gated] <= float(safe.sum()) * (1 + 1e-3) + 1e-4)


@FAST
@given(case=cases(acts=("relu",)), alphas=st.lists(st.integers(0, 8), min_size=2, max_size=5, unique=True))
def test_blend_is_linear_in_alpha(case, alphas):
    """x' = x + α (x_safe − x): a fixed displacement per token, scaled by α (ReLU: the gate and the solve do
    not depend on α)."""
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    full = steerer.steer(x, SteeringConfig(blend=1.0)) - x
    for a in sorted(alphas):
        alpha = a / 8
        out = steerer.steer(x, SteeringConfig(blend=alpha))
        torch.testing.assert_close(out - x, alpha * full, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ repel


@FAST
@given(case=cases(scale=True), betas=st.lists(st.integers(0, 32), min_size=2, max_size=6, unique=True))
def test_repel_projection_decreases_monotonically_in_beta(case, betas):
    sae, harmful, x = case
    betas = [b / 8 for b in sorted(betas)]  # 0 … 4 in steps of 1/8
    steerer = PositionSteerer(sae, harmful)
    flat = x.reshape(-1, sae.d)
    z_H = sae.encode(flat)[:, harmful]  # the input's harmful code
    v = z_H @ sae.W_dec[harmful]  # Σ_{j∈H} z_j d_j per token (scaled space)
    gated = z_H.sum(-1) > 0
    assume(bool(gated.any()))
    s = float(sae.scale)
    vv = (v * v).sum(-1)
    proj = []
    for beta in betas:
        out = steerer.steer(x, SteeringConfig(repel=beta)).reshape(-1, sae.d)
        proj.append((out * v).sum(-1))
        # exactly x − β v / s on gated tokens, untouched elsewhere
        torch.testing.assert_close(out[gated], flat[gated] - beta * v[gated] / s, atol=1e-4, rtol=1e-4)
        assert torch.equal(out[~gated], flat[~gated])
    proj = torch.stack(proj)  # [len(betas), N]
    tol = 1e-5 * (flat.norm(dim=-1) * v.norm(dim=-1) + 1)
    for a, b in zip(proj[:-1], proj[1:]):
        assert torch.all(b[gated] <= a[gated] + tol[gated])
    # strictly lower by (Δβ) |v|² / s overall
    drop = proj[0] - proj[-1]
    expect = (betas[-1] - betas[0]) * vv / s
    torch.testing.assert_close(drop[gated], expect[gated], atol=1e-3, rtol=1e-3)
    clear = gated & (expect > 100 * tol)
    assert torch.all(drop[clear] > 0)


# -------------------------------------------------------------------------------------- cond / uncond


@FAST
@given(case=cases(), ab=strengths(), order=st.sampled_from([[0, 1], [1, 0]]), pn=st.booleans())
def test_cond_and_uncond_halves_are_independent(case, ab, order, pn):
    sae, harmful, x = case
    x = torch.cat([x, x.flip(0).roll(1, dims=1) * 0.9])  # an even batch whose halves differ
    B, T, _ = x.shape
    steerer = PositionSteerer(sae, harmful)
    cfg = SteeringConfig(blend=ab[0], repel=ab[1], preserve_norm=pn)
    halves = {}
    for which in ("cond", "uncond"):
        mask = half_rows(B, order, which)
        assert mask.shape == (B,) and int(mask.sum()) == B // 2
        out = steerer.steer(x, cfg.with_(apply_to=which), mask)
        assert torch.equal(out[~mask], x[~mask]), f"apply_to={which} changed the other half"
        alone = steerer.steer(x[mask], cfg)
        assert torch.equal(out[mask], alone), f"apply_to={which}: differs from steering the {which} half alone"
        halves[which] = (mask, alone)
    both = steerer.steer(x, cfg, half_rows(B, order, "both"))
    separate = x.clone()
    for mask, alone in halves.values():
        separate[mask] = alone
    torch.testing.assert_close(both, separate, atol=1e-5, rtol=1e-5)


def test_half_rows_masks():
    assert half_rows(4, [0, 1], "both") is None
    assert half_rows(4, None, "both") is None
    assert half_rows(4, [0, 1], "cond").tolist() == [True, True, False, False]
    assert half_rows(4, [0, 1], "uncond").tolist() == [False, False, True, True]
    assert half_rows(6, [1, 0], "cond").tolist() == [False] * 3 + [True] * 3
    assert half_rows(2, [0], "cond").tolist() == [True, True]
    assert half_rows(2, [0], "uncond").tolist() == [False, False]


@pytest.mark.parametrize("batch,cou", [(5, [0, 1]), (3, [0, 1]), (4, [0, 1, 0])])
def test_half_rows_rejects_unsplittable_batch(batch, cou):
    with pytest.raises(ValueError, match=rf"batch of {batch} cannot be split into {len(cou)}"):
        half_rows(batch, cou, "cond")


@pytest.mark.parametrize("cou", [None, []])
@pytest.mark.parametrize("apply", ["cond", "uncond"])
def test_half_rows_needs_cond_or_uncond(cou, apply):
    with pytest.raises(ValueError, match="cond_or_uncond") as e:
        half_rows(4, cou, apply)
    assert repr(apply) in str(e.value)


# ----------------------------------------------------------------------------------------- dtype, device


@FAST
@given(case=cases(), ab=strengths(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_dtype_and_device_follow_the_input(case, ab, dtype):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    cfg = SteeringConfig(blend=ab[0], repel=ab[1])
    first = steerer.steer(x, cfg)
    xl = x.to(dtype)
    low = steerer.steer(xl, cfg)
    assert low.dtype == dtype and low.device == x.device and low.shape == x.shape
    ref = steerer.steer(xl.float(), cfg)  # the same tokens, steered in float32
    assert ref.dtype == torch.float32
    err = ((low.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)).flatten()
    tol = 0.02 if dtype == torch.float16 else 0.1
    # loose: with TopK or JumpReLU, rounding the code can flip a latent in or out on a token or two
    allowed = 0 if case.params["act"] == "relu" else max(1, len(err) // 10)
    assert int((err > tol).sum()) <= allowed, f"{dtype} differs from float32 by up to {float(err.max()):.3g}"
    # switching back to float32 rebuilds the working copy from the master weights: nothing was lost
    assert torch.equal(steerer.steer(x, cfg), first)
    assert steerer.sae.W_enc.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ACTS)
def test_dtype_each(dtype, act):
    sae, harmful, g = build_sae(seed=7, d=24, mult=3, k=8, act=act, h=4)
    x = planted(sae, harmful, g, 2, 5).to(dtype)
    steerer = PositionSteerer(sae, harmful)
    out = steerer.steer(x, SteeringConfig(blend=0.7, repel=0.5))
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    assert torch.isfinite(out.float()).all()
    assert not torch.equal(out, x)
    assert steerer.harmful_mass(x).dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_follows_input(dtype):
    sae, harmful, g = build_sae(seed=3, d=32, mult=3, k=8, act="topk", h=5)
    x = planted(sae, harmful, g, 2, 6)
    steerer = PositionSteerer(sae, harmful)
    cfg = SteeringConfig(blend=1.0, repel=0.5)
    ref = steerer.steer(x, cfg)
    out = steerer.steer(x.cuda().to(dtype), cfg)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert sae.W_enc.device.type == "cpu", "the master weights stay where they were loaded"
    assert float((out.cpu().float() - ref).norm() / ref.norm()) < 0.15


# ------------------------------------------------------------------------------------------ preserve_norm


@FAST
@given(case=cases(), ab=strengths())
def test_preserve_norm_keeps_token_norms(case, ab):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful)
    gated = steerer.harmful_mass(x) > 0
    out = steerer.steer(x, SteeringConfig(blend=ab[0], repel=ab[1], preserve_norm=True))
    torch.testing.assert_close(out.norm(dim=-1)[gated], x.norm(dim=-1)[gated], rtol=1e-4, atol=1e-6)
    assert torch.equal(out[~gated], x[~gated])
    # same direction as the unnormalised result
    free = steerer.steer(x, SteeringConfig(blend=ab[0], repel=ab[1]))
    cos = torch.nn.functional.cosine_similarity(out[gated], free[gated], dim=-1)
    assert torch.all(cos > 1 - 1e-4)


# ------------------------------------------------------------------------------------- activation scale


def rescaled(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    other = SparseAutoencoder(sae.d, sae.latents, sae.k, sae.activation, scale)
    other.load_state_dict({k: v for k, v in sae.state_dict().items() if k != "scale"}, strict=False)
    return other.requires_grad_(False)


@FAST
@given(case=cases(), ab=strengths(), e=st.integers(-4, 4), pn=st.booleans())
def test_scale_is_a_change_of_units(case, ab, e, pn):
    """An SAE with scale s sees x exactly as the same SAE with scale 1 sees x·s: same code and harmful
    mass, and the steered output is the scale-1 result divided by s (bit for bit for s a power of 2)."""
    sae1, harmful, x1 = case  # scale 1
    s = 2.0 ** e
    sae_s = rescaled(sae1, s)
    x = x1 / s  # the same activations in units where the SAE needs scale s
    a, b = PositionSteerer(sae_s, harmful), PositionSteerer(sae1, harmful)
    assert torch.equal(sae_s.encode(x.reshape(-1, sae1.d)), sae1.encode(x1.reshape(-1, sae1.d)))
    assert torch.equal(a.harmful_mass(x), b.harmful_mass(x1))
    cfg = SteeringConfig(blend=ab[0], repel=ab[1], preserve_norm=pn)
    assert torch.equal(a.steer(x, cfg) * s, b.steer(x1, cfg))


@FAST
@given(case=cases(), ab=strengths(), s=st.floats(0.05, 20.0))
def test_scale_any_value(case, ab, s):
    sae1, harmful, x1 = case
    sae_s = rescaled(sae1, s)
    x = x1 / s
    a, b = PositionSteerer(sae_s, harmful), PositionSteerer(sae1, harmful)
    ma, mb = a.harmful_mass(x), b.harmful_mass(x1)
    torch.testing.assert_close(ma, mb, atol=1e-4, rtol=1e-4)
    # away from the gate and from TopK ties the steered tokens agree up to the change of units
    assume(bool(((ma > 1e-3) == (mb > 1e-3)).all()))
    cfg = SteeringConfig(blend=ab[0], repel=ab[1], threshold=1e-3)
    out_a, out_b = a.steer(x, cfg) * s, b.steer(x1, cfg)
    same = (ma - 1e-3).abs() > 1e-4
    assume(bool(same.any()))
    torch.testing.assert_close(out_a[same], out_b[same], atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------- schedule and window


@st.composite
def schedules(draw):
    n = draw(st.integers(1, 40))
    steps = draw(st.lists(st.floats(0.01, 2.0), min_size=n, max_size=n))
    sig = torch.tensor([0.0] + steps, dtype=torch.float64).cumsum(0).flip(0)  # n+1 sigmas, descending to 0
    return sig.to(draw(st.sampled_from([torch.float32, torch.float64])))


@settings(FAST, max_examples=50)
@given(sched=schedules(), data=st.data())
def test_schedule_progress_steps(sched, data):
    n = len(sched) - 1
    for i in range(n):
        assert schedule_progress(float(sched[i]), sched) == i / n
        assert schedule_progress(sched[i].reshape(1).repeat(3), sched) == i / n  # a batch of sigmas
        u = data.draw(st.floats(0.02, 0.98))
        mid = float(sched[i + 1]) + u * float(sched[i] - sched[i + 1])
        if mid > float(sched[i + 1]) * (1 + 1e-4):  # within 1e-5 (relative) of a step it counts as that step
            assert schedule_progress(mid, sched) == i / n, "an intermediate sigma belongs to the step it follows"
    assert schedule_progress(float(sched[0]) * 1.5, sched) == 0.0


@settings(FAST, max_examples=50)
@given(n=st.integers(1, 40), cuts=st.lists(st.floats(0.001, 0.999), max_size=4), at_steps=st.lists(st.integers(1, 39),
                                                                                                  max_size=4))
def test_windows_partition_the_steps(n, cuts, at_steps):
    sched = torch.linspace(1.0, 0.0, n + 1)
    # cuts anywhere, and cuts exactly on steps (i/n is where step i starts)
    edges = [0.0] + sorted(set(cuts) | {i / n for i in at_steps if i < n}) + [1.0]
    windows = [SteeringConfig(start=a, end=b) for a, b in zip(edges[:-1], edges[1:])]
    for i in range(n):
        p = schedule_progress(float(sched[i]), sched)
        inside = [w for w in windows if in_window(p, w)]
        assert len(inside) == 1, f"step {i}/{n} is in {len(inside)} windows of {edges}"
        w = inside[0]
        assert w.start <= p and (p < w.end or w.end == 1.0)
    # end = 1 includes the last step; a window ending before it does not
    last = schedule_progress(float(sched[n - 1]), sched)
    assert in_window(last, SteeringConfig(start=last, end=1.0))
    assert not in_window(last, SteeringConfig(start=0.0, end=last))
    assert in_window(None, SteeringConfig(start=0.5, end=0.6)), "no schedule known: the window cannot exclude"


def test_schedule_progress_unknown():
    sched = torch.tensor([1.0, 0.5, 0.0])
    assert schedule_progress(None, sched) is None
    assert schedule_progress(0.5, None) is None
    assert schedule_progress(0.5, torch.tensor([1.0])) is None
    assert schedule_progress(torch.tensor([0.5, 0.5]), sched) == 0.5


# --------------------------------------------------------------------------------------- SteeringConfig


@pytest.mark.parametrize("kwargs,field", [
    ({"blend": -0.1}, "blend"), ({"blend": 1.5}, "blend"), ({"blend": math.nan}, "blend"),
    ({"repel": -1.0}, "repel"), ({"repel": math.nan}, "repel"), ({"repel": math.inf}, "repel"),
    ({"threshold": -0.5}, "threshold"), ({"threshold": math.nan}, "threshold"),
    ({"start": -0.1}, "start"), ({"end": 1.5}, "end"), ({"start": 0.7, "end": 0.3}, "start"),
    ({"start": math.nan}, "start"),
    ({"blend_passes": 0}, "blend_passes"),
    ({"apply_to": "positive"}, "apply_to"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}=") as e:
        SteeringConfig(**kwargs)
    assert str(e.value).count(";") == 0, "one problem, one message"


def test_config_reports_every_problem_and_accepts_good_values():
    with pytest.raises(ValueError) as e:
        SteeringConfig(blend=2.0, repel=-1.0, apply_to="x")
    for field in ("blend=", "repel=", "apply_to="):
        assert field in str(e.value)
    cfg = SteeringConfig(blend=1.0, repel=5.0, threshold=0.5, start=0.2, end=0.2, apply_to="uncond",
                         preserve_norm=True, blend_passes=1)
    assert not cfg.is_identity and SteeringConfig().is_identity
    assert cfg.with_(blend=0.0, repel=0.0).is_identity
    with pytest.raises(ValueError, match="blend="):
        cfg.with_(blend=3.0)


def test_steer_rejects_wrong_width():
    sae, harmful, g = build_sae(seed=1, d=16, mult=2, k=4, act="topk", h=2)
    steerer = PositionSteerer(sae, harmful)
    with pytest.raises(ValueError, match="width 12 does not match the dictionary's 16"):
        steerer.steer(torch.randn(2, 3, 12), SteeringConfig(repel=1.0))


def test_no_harmful_latents_and_empty_input_are_identity():
    sae, _, g = build_sae(seed=2, d=16, mult=2, k=4, act="relu", h=1)
    x = torch.randn(2, 3, 16)
    assert PositionSteerer(sae, torch.zeros(0, dtype=torch.long)).steer(x, SteeringConfig(repel=1.0)) is x
    empty = torch.zeros(2, 0, 16)
    assert PositionSteerer(sae, torch.tensor([0, 1])).steer(empty, SteeringConfig(repel=1.0)) is empty
    none = torch.zeros(2, dtype=torch.bool)
    assert PositionSteerer(sae, torch.tensor([0, 1])).steer(x, SteeringConfig(repel=1.0), none) is x
