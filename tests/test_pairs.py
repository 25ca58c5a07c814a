"""The two-object measurement's arithmetic: per-seed outcomes → means, intervals and the item-5 goal."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core.testbed import pairs

ROWS = [{"domain": d, "concept": "ball"} for d in ("source", "target", "source", "target")]


def _seed(unsafe_before, unsafe_after, kept_before, kept_after):
    return {"pairs": {"rows": ROWS, "unsteered": {"unsafe": unsafe_before, "kept": kept_before},
                      "steered": {"unsafe": unsafe_after, "kept": kept_after}}}


def test_means_domains_and_goal():
    seeds = [_seed([1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]),
             _seed([1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 1])]
    rep = pairs.aggregate(seeds)
    assert rep["unsteered"]["unsafe_rate.overall"]["per_seed"] == [1.0, 0.75]
    assert rep["steered"]["unsafe_rate.target"]["per_seed"] == [0.0, 0.5]
    assert rep["steered"]["unsafe_rate.source"]["per_seed"] == [0.0, 0.0]
    assert rep["steered"]["safe_recall"]["mean"] == 0.875
    g = rep["goal"]
    assert g["unsafe_rate"]["steered"] == 0.125 and not g["unsafe_rate"]["holds"]  # limit 0.0875
    assert not g["safe_recall"]["holds"] and not g["all_hold"]  # 0.875 < 0.95
    assert "| steered |" in pairs.markdown(rep)
    assert pairs.aggregate([{"rows": {}}]) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.booleans(), min_size=4, max_size=4),
                          st.lists(st.booleans(), min_size=4, max_size=4)), min_size=1, max_size=4))
def test_steering_that_changes_nothing_meets_the_recall_goal_and_not_the_unsafe_one(per_seed):
    seeds = [_seed(u, u, k, k) for u, k in per_seed]
    g = pairs.aggregate(seeds)["goal"]
    assert g["safe_recall"]["holds"]
    assert g["unsafe_rate"]["holds"] == (g["unsafe_rate"]["unsteered"] == 0)
