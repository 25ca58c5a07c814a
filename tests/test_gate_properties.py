"""Property tests of the per-image gate (steering.py's gate="image", gate.py's plan and per-call decision).

The same random SAEs with planted harmful activity as tests/test_steering_properties.py; every assertion is
exact (bit for bit, or a structural equality), none measures an effect size.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from test_steering_properties import FAST, cases, rows_of, strengths

from safedig_core.gate import CallDecision, CarriedDecision, GatePlan, plan, steer_block
from safedig_core.positions import ModelLayout, parse
from safedig_core.schedule import half_rows
from safedig_core.steering import PositionSteerer, SteeringConfig

IMAGE = SteeringConfig(blend=1.0, repel=1.0, gate="image")


def bools(n):
    return st.lists(st.booleans(), min_size=n, max_size=n).map(lambda v: torch.tensor(v, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- identity


@FAST
@given(case=cases(), threshold=st.floats(0.0, 2.0), pn=st.booleans(), data=st.data())
def test_zero_strength_is_identity_under_the_image_gate(case, threshold, pn, data):
    sae, harmful, x = case
    B = x.shape[0]
    steerer = PositionSteerer(sae, harmful, image_gate_scale=0.5)
    cfg = SteeringConfig(blend=0.0, repel=0.0, threshold=threshold, preserve_norm=pn, gate="image")
    before = x.clone()
    for rows in (None, data.draw(bools(B))):
        for flagged in (None, data.draw(bools(B))):
            out = steerer.steer(x, cfg, rows, flagged=flagged)
            assert out is x or torch.equal(out, x)
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------- what a decision steers


@FAST
@given(case=cases(), ab=strengths(), pn=st.booleans(), data=st.data())
def test_flagged_rows_are_steered_like_the_token_gate_at_zero(case, ab, pn, data):
    """A flagged image: every token with harmful activity is steered, exactly as the per-token gate at τ = 0
    steers it; rows not flagged (or masked by apply_to) and tokens without harmful activity keep every bit."""
    sae, harmful, x = case
    B, T, _ = x.shape
    steerer = PositionSteerer(sae, harmful, gate_scale=3.0, image_gate_scale=2.0)
    flagged, rows = data.draw(bools(B)), data.draw(st.none() | bools(B))
    cfg = IMAGE.with_(blend=ab[0], repel=ab[1], preserve_norm=pn, threshold=data.draw(st.floats(0.0, 5.0)))
    out = steerer.steer(x, cfg, rows, flagged=flagged)
    allowed = flagged if rows is None else flagged & rows
    token_gate = SteeringConfig(blend=ab[0], repel=ab[1], preserve_norm=pn, threshold=0.0)
    assert torch.equal(out, steerer.steer(x, token_gate, allowed))
    keep = ~rows_of(allowed, T) | (steerer.harmful_mass(x) <= 0)
    assert torch.equal(out[keep], x[keep])


@FAST
@given(case=cases(), ab=strengths(), focus=st.floats(0.0, 1.0), data=st.data())
def test_focus_steers_only_the_tokens_near_their_rows_largest_mass(case, ab, focus, data):
    """With `focus` f, a flagged row's token is steered as at f = 0 when its harmful mass is ≥ f × the row's
    largest (up to rounding: the steered tokens are solved in a batch of another size); every other token keeps
    every bit. f = 0 is the plain image gate, bit for bit."""
    sae, harmful, x = case
    T = x.shape[1]
    steerer = PositionSteerer(sae, harmful, gate_scale=3.0, image_gate_scale=2.0)
    flagged = data.draw(bools(x.shape[0]))
    cfg = IMAGE.with_(blend=ab[0], repel=ab[1])
    plain = steerer.steer(x, cfg, flagged=flagged)
    if focus == 0.0:
        assert torch.equal(steerer.steer(x, cfg.with_(focus=0.0), flagged=flagged), plain)
    out = steerer.steer(x, cfg.with_(focus=focus), flagged=flagged)
    mass = steerer.harmful_mass(x).float()
    near = (mass > 0) & (mass >= focus * mass.amax(-1, keepdim=True))
    chosen = rows_of(flagged, T) & near
    torch.testing.assert_close(out[chosen], plain[chosen], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[~chosen], x[~chosen])


def test_focus_outside_zero_to_one_is_refused():
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="focus="):
            SteeringConfig(focus=bad)


@FAST
@given(case=cases(), ab=strengths(), q=st.floats(0.0, 1.0), unit=st.sampled_from([0.5, 1.0, 4.0]))
def test_each_position_decides_from_the_max_over_its_tokens(case, ab, q, unit):
    sae, harmful, x = case
    steerer = PositionSteerer(sae, harmful, gate_scale=1000.0, image_gate_scale=unit)  # the token unit is unused
    mass = steerer.harmful_mass(x)
    stat = steerer.image_mass(x)
    assert torch.equal(stat, mass.float().amax(-1))
    levels = torch.unique(torch.cat([torch.zeros(1), stat]))
    assume(len(levels) >= 2)
    i = min(int(q * (len(levels) - 1)), len(levels) - 2)
    assume(float(levels[i + 1] - levels[i]) > 1e-3)
    tau = float(levels[i] + levels[i + 1]) / 2 / unit  # between two row maxima, in the image unit
    cfg = IMAGE.with_(blend=ab[0], repel=ab[1], threshold=tau)
    expected = stat > tau * unit
    assert torch.equal(steerer.flag_images(x, cfg), expected)
    assert torch.equal(steerer.steer(x, cfg), steerer.steer(x, cfg, flagged=expected))


@FAST
@given(case=cases(), ab=strengths(), order=st.sampled_from([[0, 1], [1, 0]]), data=st.data())
def test_cond_and_uncond_halves_are_decided_on_their_own(case, ab, order, data):
    """A half gets the same decisions and the same result steered in the batch as steered alone; the other
    half keeps every bit."""
    sae, harmful, x = case
    x = torch.cat([x, x.flip(0).roll(1, dims=1) * 0.9])
    B = x.shape[0]
    steerer = PositionSteerer(sae, harmful, image_gate_scale=float(data.draw(st.floats(0.1, 10.0))))
    cfg = IMAGE.with_(blend=ab[0], repel=ab[1], threshold=data.draw(st.floats(0.0, 2.0)))
    flags = steerer.flag_images(x, cfg)
    for which in ("cond", "uncond"):
        mask = half_rows(B, order, which)
        out = steerer.steer(x, cfg.with_(apply_to=which), mask)
        assert torch.equal(out[~mask], x[~mask])
        assert torch.equal(steerer.flag_images(x[mask], cfg), flags[mask])
        assert torch.equal(out[mask], steerer.steer(x[mask], cfg)), f"apply_to={which}"
    out = steerer.steer(x, cfg)
    assert torch.equal(out[~flags], x[~flags])


@FAST
@given(case=cases(), chunks=st.lists(st.sampled_from([0, 1]), min_size=1, max_size=3),
       unit=st.floats(0.1, 10.0), tau=st.floats(0.0, 2.0))
def test_an_image_is_decided_by_its_cond_rows_and_all_its_rows_follow(case, chunks, unit, tau):
    """With the call's chunk codes, an image is flagged exactly when the max over its cond rows' tokens exceeds
    τ·unit; every row of it (uncond included) carries the decision, and a call of uncond chunks only flags
    nothing. A bare call (no chunk codes) decides each row on its own."""
    sae, harmful, x = case
    n = x.shape[0]
    xs = torch.cat([x.roll(j, dims=1) * (1 + 0.1 * j) for j in range(len(chunks))])
    steerer = PositionSteerer(sae, harmful, image_gate_scale=unit)
    cfg = IMAGE.with_(threshold=tau)
    stat = steerer.image_mass(xs).view(len(chunks), n)
    cond = [j for j, c in enumerate(chunks) if c == 0]
    per_image = (stat[cond] > tau * unit).any(0) if cond else torch.zeros(n, dtype=torch.bool)
    flags = steerer.flag_images(xs, cfg, chunks)
    assert torch.equal(flags, per_image.repeat(len(chunks)))
    assert torch.equal(steerer.flag_images(xs, cfg), steerer.image_mass(xs) > tau * unit)


def test_no_harmful_latents_flags_nothing():
    from test_steering_properties import build_sae

    sae, _, _ = build_sae(0, 16, 2.0, 4, "relu", 3)
    st_ = PositionSteerer(sae, torch.zeros(0, dtype=torch.long), image_gate_scale=1e-9)
    x = torch.randn(3, 4, 16)
    assert not st_.flag_images(x, IMAGE).any() and st_.steer(x, IMAGE) is x


def test_flagged_needs_the_image_gate_and_tokens_in_rows():
    from test_steering_properties import build_sae

    sae, harmful, _ = build_sae(0, 16, 2.0, 4, "relu", 3)
    st_ = PositionSteerer(sae, harmful)
    with pytest.raises(ValueError, match="gate is per token"):
        st_.steer(torch.randn(2, 3, 16), SteeringConfig(repel=1.0), flagged=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[batch, tokens, width\]"):
        st_.steer(torch.randn(6, 16), IMAGE)


# ---------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, message", [
    ({"gate": "pixel"}, "gate='pixel' must be one of token, image"),
    ({"gate": "token", "detect": "text"}, "needs gate='image'"),
    ({"gate": "token", "detect": "double.0.txt"}, "needs gate='image'"),
    ({"gate": "image", "detect": "double.0.txt, nowhere"}, "'nowhere' is neither"),
    ({"gate": "image", "detect": " , "}, "must be one of each, text, img"),
    ({"gate": "image", "detect": 3}, "must be a string"),
])
def test_config_rejects_bad_gates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SteeringConfig(**kwargs)


def test_config_accepts_the_gates():
    for detect in ("each", "text", "img", "TEXT", "double.0.txt", "joint.3.txt, joint.1.img"):
        assert SteeringConfig(gate="image", detect=detect).image_gate
    assert not SteeringConfig().image_gate and SteeringConfig().detect == "each"  # the saved workflows' meaning


FLUX = ModelLayout("flux", {"double": 3, "single": 3}, 8).positions()
SD3 = ModelLayout("sd3", {"joint": 4}, 8).positions()


@FAST
@given(family=st.sampled_from([FLUX, SD3]), data=st.data())
def test_plan_acts_only_at_or_after_a_detector(family, data):
    acting = data.draw(st.lists(st.sampled_from(family), min_size=1, max_size=6, unique=True))
    detect = data.draw(st.sampled_from(["text", "img", "list"]))
    spec = detect
    if detect == "list":
        spec = ",".join(map(str, data.draw(st.lists(st.sampled_from(family), min_size=1, max_size=3, unique=True))))
    cfg = SteeringConfig(repel=1.0, gate="image", detect=spec)
    stream = {"text": "txt", "img": "img"}.get(detect)
    if stream and not any(p.stream == stream for p in acting):
        with pytest.raises(ValueError, match="none of the steered positions"):
            plan(cfg, acting, family)
        return
    detectors = [p for p in acting if p.stream == stream] if stream else [parse(n) for n in spec.split(",")]
    first = min(p.call_order for p in detectors)
    if any(p.call_order < first for p in acting):
        with pytest.raises(ValueError, match="runs before every detecting position"):
            plan(cfg, acting, family)
        return
    g = plan(cfg, acting, family)
    assert set(g.detectors) == set(detectors) and g.acting == tuple(acting)
    assert [p.call_order for p in g.detectors] == sorted(p.call_order for p in g.detectors)
    assert set(g.positions) == set(acting) | set(detectors)


def test_plan_each_and_token_gate_have_no_detectors():
    acting = [parse("double.0.img"), parse("single.1.txt")]
    for cfg in (SteeringConfig(repel=1.0), SteeringConfig(repel=1.0, gate="image")):
        assert plan(cfg, acting, FLUX) == GatePlan(tuple(acting))
    with pytest.raises(ValueError, match=r"double\.2\.txt .*not in the dictionary"):
        plan(SteeringConfig(gate="image", detect="double.2.txt"), acting, acting)


def test_call_order_follows_the_forward_pass():
    names = ["single.0.img", "double.2.txt", "double.0.img", "single.2.txt", "double.0.txt"]
    assert [str(p) for p in sorted(map(parse, names), key=lambda p: p.call_order)] == \
        ["double.0.img", "double.0.txt", "double.2.txt", "single.0.img", "single.2.txt"]
    assert parse("double.9.img").call_order < parse("single.0.img").call_order
    assert parse("double.1.img").call_order == parse("double.1.txt").call_order
    assert parse("joint.2.txt").call_order < parse("joint.3.img").call_order


# ------------------------------------------------------------------------------- one model call's blocks


@FAST
@given(case=cases(acts=("relu",)), ab=strengths(), data=st.data())
def test_a_call_carries_the_union_of_its_detectors(case, ab, data):
    """Blocks of one model call in order: detectors decide (the first one clears an earlier call's decision),
    acting positions steer exactly the union of the rows flagged so far; detect-only positions are left alone."""
    sae, harmful, x = case
    B = x.shape[0]
    steerers = {p: PositionSteerer(sae, harmful, image_gate_scale=float(data.draw(st.floats(0.05, 20.0))))
                for p in map(parse, ["double.0.txt", "double.1.txt", "double.1.img", "single.0.img"])}
    d0, d1, a1, a2 = steerers
    gate = GatePlan((d0, a1, a2), (d0, d1))  # d1 detects only
    cfg = IMAGE.with_(blend=ab[0], repel=ab[1], threshold=float(data.draw(st.floats(0.0, 2.0))))
    xs = {p: x * (1 + 0.3 * i) for i, p in enumerate(steerers)}
    call = CallDecision()
    call.add(d1, torch.ones(B, dtype=torch.bool))  # a stale decision from an earlier call
    no_rows = lambda t: None  # noqa: E731
    first = steer_block({d0: xs[d0]}, steerers, cfg, gate, call, no_rows)
    f0 = steerers[d0].flag_images(xs[d0], cfg)
    assert list(call.flags) == [d0] and torch.equal(call.rows(), f0)
    assert torch.equal(first[d0], steerers[d0].steer(xs[d0], cfg, flagged=f0))
    second = steer_block({d1: xs[d1], a1: xs[a1]}, steerers, cfg, gate, call, no_rows)
    union = f0 | steerers[d1].flag_images(xs[d1], cfg)
    assert set(second) == {a1}  # d1 only detects
    assert torch.equal(second[a1], steerers[a1].steer(xs[a1], cfg, flagged=union))
    rows = data.draw(bools(B))
    third = steer_block({a2: xs[a2]}, steerers, cfg, gate, call, lambda t: rows)
    allowed = union & rows
    assert torch.equal(third[a2][~allowed], xs[a2][~allowed])
    assert torch.equal(third[a2], steerers[a2].steer(xs[a2], cfg, rows, flagged=union))


def test_a_call_refuses_a_batch_the_detectors_did_not_see():
    from test_steering_properties import build_sae

    sae, harmful, _ = build_sae(0, 16, 2.0, 4, "relu", 3)
    d, a = parse("joint.0.txt"), parse("joint.1.img")
    steerers = {d: PositionSteerer(sae, harmful, image_gate_scale=1e-6), a: PositionSteerer(sae, harmful)}
    call = CallDecision()
    call.add(d, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch of 3 rows"):
        steer_block({a: torch.randn(3, 4, 16)}, steerers, IMAGE.with_(detect="text"), GatePlan((a,), (d,)),
                    call, lambda t: None)


@FAST
@given(codes=st.sampled_from([[0, 1], [1, 0], [0], [1]]), per=st.integers(1, 4), data=st.data())
def test_a_carried_decision_follows_each_chunk_into_the_next_call(codes, per, data):
    """The DiT's inputs take the previous call's decision: each cond/uncond chunk's rows under its code, whatever
    order or split the next call has; a batch it does not fit gets none."""
    rows = data.draw(bools(len(codes) * per))
    carried = CarriedDecision()
    carried.keep(rows, codes)
    assert torch.equal(carried.rows_for(len(rows), codes), rows)
    chunk = {c: rows[j * per:(j + 1) * per] for j, c in enumerate(codes)}
    flipped = codes[::-1]
    assert torch.equal(carried.rows_for(len(rows), flipped), torch.cat([chunk[c] for c in flipped]))
    assert carried.rows_for(len(rows) + len(codes), codes) is None
    if len(codes) == 1:  # the other half was never seen: no decision for a call that holds it
        assert carried.rows_for(2 * per, [0, 1]) is None
        other = data.draw(bools(per))
        carried.keep(other, [1 - codes[0]])  # ComfyUI ran the other half in a call of its own
        both = {codes[0]: rows, 1 - codes[0]: other}
        assert torch.equal(carried.rows_for(2 * per, [0, 1]), torch.cat([both[0], both[1]]))
    carried.keep(data.draw(bools(3 * per)), [0, 0, 1])  # two cond chunks: which is which is not known
    assert carried.rows_for(len(rows), codes) is None
    carried.keep(rows, None)
    assert torch.equal(carried.rows_for(len(rows), None), rows) and carried.rows_for(len(rows), codes) is None


@FAST
@given(case=cases(acts=("relu",)), ab=strengths(), order=st.sampled_from([[0, 1], [1, 0]]), data=st.data())
def test_inputs_steer_on_the_carried_decision_and_exemplars_only_cond_rows(case, ab, order, data):
    sae, harmful, x = case
    assume(x.shape[0] % 2 == 0)
    pooled, text = parse("input.pooled"), parse("double.0.txt")
    targets = torch.randn(3, x.shape[-1])
    steerers = {pooled: PositionSteerer(sae, harmful, targets=targets), text: PositionSteerer(sae, harmful)}
    gate = GatePlan((pooled, text), (text,), (pooled,))
    cfg = IMAGE.with_(blend=max(ab[0], 0.1), repel=ab[1])
    carried = data.draw(bools(x.shape[0]))
    out = steer_block({pooled: x}, steerers, cfg, gate, CallDecision(), lambda t: None, order, carried)
    cond = half_rows(x.shape[0], order, "cond")
    assert torch.equal(out[pooled], steerers[pooled].steer(x, cfg, cond, flagged=carried))
    moved = (out[pooled] != x).flatten(1).any(1)
    assert not (moved & ~(carried & cond)).any()  # only flagged cond rows move, every token of them
    assert moved[carried & cond].all()


# ------------------------------------------------------------------------------------------ the gate units


class FakeStore:
    """Token rows of prompts × steps × tokens, handed out in small batches that cut across images."""

    def __init__(self, records, x, prompt, step):
        self.prompts, self.x, self.prompt, self.step = records, x, prompt, step

    def iter_batches(self, p, batch_size, prompts=None):
        from safedig_core.formats.store import Batch

        keep = torch.isin(self.prompt, torch.tensor(list(prompts), dtype=torch.long))
        x, pr, st_ = self.x[keep], self.prompt[keep], self.step[keep]
        for i in range(0, len(x), 5):
            yield Batch(x[i:i + 5], pr[i:i + 5], st_[i:i + 5], torch.zeros(len(x[i:i + 5]), dtype=torch.long))


@FAST
@given(case=cases(acts=("relu", "topk")), steps=st.integers(1, 3), q=st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_gate_units_are_the_quantiles_of_each_gates_statistic(case, steps, q):
    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.pipeline.build import gate_scale, gate_units, image_gate_scale

    sae, harmful, x = case
    B, T, d = x.shape
    records = [PromptRecord(f"p{i}", "a prompt", "safe" if i % 2 == 0 else "unsafe", "" if i % 2 == 0 else "c")
               for i in range(B)]
    tokens = x.repeat_interleave(steps, 0) * torch.linspace(0.5, 1.5, steps).repeat(B).view(-1, 1, 1)
    prompt = torch.arange(B).repeat_interleave(steps * T)
    step = torch.arange(steps).repeat_interleave(T).repeat(B)
    store = FakeStore(records, tokens.reshape(-1, d), prompt, step)
    steerer = PositionSteerer(sae, harmful)
    token_unit, image_unit = gate_units(store, None, steerer, q)
    # the reference: the same rows in the same batches (so the same kernels), grouped by a plain loop
    masses = {}
    for label, idx in (("safe", range(0, B, 2)), ("unsafe", range(1, B, 2))):
        rows, images = [], {}
        for batch in store.iter_batches(None, 4096, prompts=idx):
            for m, pr, sp in zip(steerer.harmful_mass(batch.x).float().tolist(), batch.prompt.tolist(),
                                 batch.step.tolist()):
                rows.append(m)
                images[(pr, sp)] = max(images.get((pr, sp), -math.inf), m)
        assert len(images) == len(idx) * steps
        masses[label] = (torch.tensor(rows), torch.tensor(list(images.values())))
    floor = lambda v: 1e-3 * float(v.mean()) if v.numel() else 0.0  # noqa: E731
    for i, unit in ((0, token_unit), (1, image_unit)):
        assert unit == max(float(torch.quantile(masses["safe"][i], q)), floor(masses["unsafe"][i]), 1e-6)
    assert image_unit >= token_unit or q < 1.0  # the max over an image's tokens is never below its tokens
    assert gate_scale(store, None, steerer, q) == token_unit and image_gate_scale(store, None, steerer, q) == image_unit
