"""Intervals over seeds and the bootstrap over prompts (evaluation/intervals.py), and the demo's rule for the
operating point (testbed/sweep.choose)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.evaluation.intervals import bootstrap_interval, seed_interval, summary, t975
from safedig_core.testbed import sweep

values = st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=8)


@given(values)
@settings(max_examples=60, deadline=None)
def test_seed_interval_contains_the_mean_and_is_symmetric(v):
    m, lo, hi = seed_interval(v)
    assert abs(m - np.mean(v)) < 1e-9
    assert lo <= m + 1e-12 and m <= hi + 1e-12
    assert abs((m - lo) - (hi - m)) < 1e-9


def test_seed_interval_matches_student_t():
    m, lo, hi = seed_interval([0.2, 0.4, 0.6])
    assert abs(m - 0.4) < 1e-12 and abs(hi - m - t975(2) * 0.2 / np.sqrt(3)) < 1e-9
    assert seed_interval([]) is None and seed_interval([0.5]) == (0.5, 0.5, 0.5)


@given(st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=20), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None)
def test_bootstrap_interval_lies_within_the_outcomes_and_around_the_mean(groups):
    lo, hi = bootstrap_interval(groups, reps=200)
    mean = np.mean([np.mean(g) for g in groups])
    assert 0.0 <= lo <= hi <= 1.0
    assert lo - 1e-9 <= mean <= hi + 1e-9 or all(len(set(g)) == 1 for g in groups)


def test_bootstrap_of_constant_outcomes_is_a_point_and_summary_keeps_per_seed_values():
    assert bootstrap_interval([[1.0] * 5, [1.0] * 3]) == (1.0, 1.0)
    s = summary([[1, 0, 1, 1], [0, 0, 1, 0]])
    assert s["mean"] == 0.5 and s["per_seed"] == [0.75, 0.25] and s["seeds95"][0] < 0.5 < s["seeds95"][1]


def _point(value, ok, unsafe):
    """A sweep point whose building outcomes have `ok` of 4 safe prompts right and `unsafe` of 4 risk ones."""
    out = sweep.Outcomes(np.array([False] * 4 + [i < unsafe for i in range(4)]),
                         np.array([i < ok for i in range(4)] + [True] * 4), np.zeros(8))
    return {"value": value, "outcomes": {"build": out}}


ROWS = [{"label": "safe", "domain": "source", "concept": "ball"}] * 4 + \
       [{"label": "unsafe", "domain": "source", "concept": "gun"}] * 4


def _set():
    return sweep.PromptSet("build", ROWS, None, _point(0, 4, 4)["outcomes"]["build"], {})


def test_operating_point_backs_off_one_step_from_the_first_point_that_loses_fidelity():
    pts = [_point(2.0, 4, 3), _point(1.5, 4, 2), _point(1.0, 4, 1), _point(0.5, 3, 0)]
    assert sweep.choose(pts, _set(), 0.0) == 1  # 1.0 passes but is next to the failing 0.5
    assert sweep.choose(pts, _set(), 0.0, backoff=False) == 2
    assert sweep.choose(pts, _set(), 0.3) == 3  # within a 0.3 drop every point passes: lowest UR
    assert sweep.choose([_point(1.0, 2, 0), _point(0.5, 1, 0)], _set(), 0.0) == 0  # nothing passes: fallback


@given(st.lists(st.floats(-3.0, 50.0), min_size=1, max_size=8), st.floats(0.0, 0.5))
def test_the_peak_rule_leaves_every_safe_building_image_alone(safe_peaks, margin):
    risky = [100.0] * 4  # risky peaks never move the rule
    pset = sweep.PromptSet("build", [{"label": "safe"}] * len(safe_peaks) + [{"label": "unsafe"}] * 4, None, None,
                           {"v": np.array(safe_peaks + risky)})
    tau = sweep.peak_rule(pset, "v", margin)
    top = max(max(safe_peaks), 0.0)
    assert tau >= top * (1 + margin) - 1e-12 and tau <= top * (1 + margin) + 0.001 + 1e-9
    assert all(p <= tau for p in safe_peaks)  # the gate opens on none of them
    pset.peaks["v"][0] = -np.inf  # an image no detector saw does not count
    assert sweep.peak_rule(pset, "v", margin) <= tau
