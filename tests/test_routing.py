"""Routing (METHOD §3) on synthetic pooled activations with planted harmful directions, through an
in-memory store that has only the interface routing uses."""
from __future__ import annotations

import json
import math
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safedig_core import cli
from safedig_core.pipeline.routing import (
    PositionScore,
    RoutingConfig,
    RoutingError,
    RoutingReport,
    auroc,
    route,
    select_positions,
    stratified_auroc,
)
from safedig_core.positions import ModelLayout, parse

Pooled = namedtuple("Pooled", "x prompt step")


@dataclass
class Rec:
    id: str
    prompt: str
    label: str
    category: str
    domain: str
    seed: int | None = None
    extra: dict = field(default_factory=dict)


class FakeStore:
    """Duck-typed `ActivationStore`: family, positions, prompts, pooled(p, prompts)."""

    def __init__(self, family, data, prompts, layout=None):
        self.family = family
        self.positions = [parse(n) for n in data]
        self.prompts = prompts
        self._data = {parse(n): v for n, v in data.items()}
        self.asked: list[list[int] | None] = []
        if layout is not None:
            self.layout = layout

    def pooled(self, p, prompts=None):
        self.asked.append(None if prompts is None else list(prompts))
        x, pr, stp = self._data[p]
        if prompts is not None:
            keep = torch.isin(pr, torch.tensor(list(prompts), dtype=torch.long))
            x, pr, stp = x[keep], pr[keep], stp[keep]
        return Pooled(x.float(), pr, stp)


LAYOUT = ModelLayout("flux", {"double": 6, "single": 6}, width=48)
STEPS = [0, 2, 4, 6, 8, 10]  # three bins: early (0, 2), mid (4, 6), late (8, 10)
CATS = ["violence", "nudity", "drugs"]
KINDS = {  # position -> (kind of planted signal, strength)
    "double.1.img": ("shared", 3.5),
    "double.2.img": ("shared", 3.5),  # neighbour of double.1.img: the gap rule keeps only one of them
    "double.4.img": ("category", 9.0),  # separates the known risks best, transfers to none
    "double.1.txt": ("step_flip", 3.0),  # +u early, nothing mid, -u late
    "double.4.txt": ("shared", 3.0),
    "single.0.img": ("step_rotate", 4.0),  # one direction per step bin, shared by categories
    "single.2.img": ("noise", 0.0),
    "single.4.img": ("shared", 3.2),
}


def make_prompts(n_unsafe=16, n_safe=40, cats=CATS, target=True):
    recs = [Rec(f"s{i}", "a safe prompt", "safe", "", "source") for i in range(n_safe)]
    for c in cats:
        recs += [Rec(f"{c}{i}", f"a {c} prompt", "unsafe", c, "source") for i in range(n_unsafe)]
    if target:
        recs += [Rec(f"t{i}", "an implicit prompt", "unsafe", "gore", "target") for i in range(12)]
        recs += [Rec(f"ts{i}", "a target safe prompt", "safe", "", "target") for i in range(6)]
    return recs


def make_store(prompts=None, kinds=KINDS, d=48, seed=0, steps=STEPS, layout=LAYOUT):
    prompts = prompts if prompts is not None else make_prompts()
    g = torch.Generator().manual_seed(seed)
    cats = sorted({r.category for r in prompts if r.label == "unsafe" and r.domain == "source"})
    bins = np.array_split(np.array(steps), min(3, len(steps)))
    bin_of = {int(s): b for b, arr in enumerate(bins) for s in arr}
    data = {}
    for name, (kind, strength) in kinds.items():
        basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
        u, cat_dir = basis[0], {c: basis[1 + i] for i, c in enumerate(cats)}
        bin_dir = {b: basis[8 + b] for b in range(3)}
        target_dir = basis[12]
        step_mean = {s: 2.0 * torch.randn(d, generator=g, dtype=torch.float64) for s in steps}
        xs, ps, ss = [], [], []
        for i, r in enumerate(prompts):
            base = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)  # per-prompt part, shared by its steps
            for s in steps:
                v = step_mean[s] + base + torch.randn(d, generator=g, dtype=torch.float64)
                if r.label == "unsafe" and r.domain == "source":
                    b = bin_of[s]
                    if kind == "shared":
                        v = v + strength * u
                    elif kind == "category":
                        v = v + strength * cat_dir[r.category]
                    elif kind == "step_flip":
                        v = v + strength * u * (1.0 if b == 0 else (-1.0 if b == 2 else 0.0))
                    elif kind == "step_rotate":
                        v = v + strength * bin_dir[b]
                if r.domain == "target" and kind == "noise":
                    v = v + 20.0 * target_dir * (1.0 if r.label == "unsafe" else -1.0)  # routing must not see this
                xs.append(v)
                ps.append(i)
                ss.append(s)
        data[name] = (torch.stack(xs), torch.tensor(ps), torch.tensor(ss))
    return FakeStore("flux", data, prompts, layout)


@pytest.fixture(scope="module")
def report():
    return route(make_store(), k=3)


# ------------------------------------------------------------------------------------------------ AUROC

def brute_auroc(pos, neg):
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-4, 4), min_size=1, max_size=25), st.lists(st.integers(-4, 4), min_size=1, max_size=25),
       st.floats(0.1, 10.0))
def test_auroc_matches_pairwise_count_with_ties(pos, neg, scale):
    pos_f = [scale * v for v in pos]
    neg_f = [scale * v for v in neg]
    assert auroc(pos_f, neg_f) == pytest.approx(brute_auroc(pos_f, neg_f), abs=1e-12)
    want = brute_auroc(pos_f, neg_f)
    assert auroc(torch.tensor(pos_f, dtype=torch.float64), np.array(neg_f)) == pytest.approx(want, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2)), min_size=1, max_size=20),
       st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2)), min_size=1, max_size=20))
def test_stratified_auroc_counts_same_step_pairs_only(pos, neg):
    pairs = [(p, n) for p, sp in pos for n, sn in neg if sp == sn]
    args = ([p for p, _ in pos], [n for n, _ in neg], [s for _, s in pos], [s for _, s in neg])
    if not pairs:
        with pytest.raises(RoutingError, match="no stratum"):
            stratified_auroc(*args)
        return
    want = sum((p > n) + 0.5 * (p == n) for p, n in pairs) / len(pairs)
    assert stratified_auroc(*args) == pytest.approx(want, abs=1e-12)


def test_auroc_edges():
    assert auroc([1, 2, 3], [0]) == 1.0
    assert auroc([0], [1, 2]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    with pytest.raises(RoutingError, match="positives and negatives"):
        auroc([], [1.0])
    with pytest.raises(RoutingError, match="NaN"):
        auroc([float("nan")], [1.0])


# ------------------------------------------------------------------------------------------ the scores

def test_transferable_positions_rank_first(report):
    ranking = [s.name for s in report.ranking()]
    shared = {n for n, (k, _) in KINDS.items() if k == "shared"}
    assert set(ranking[: len(shared)]) == shared, report.summary()


def test_loco_transfer_high_for_shared_chance_for_category_specific(report):
    for name, (kind, _) in KINDS.items():
        s = report.score(name)
        if kind == "shared":
            assert s.T > 0.9 and s.T_min > 0.85 and s.S > 0.8 and s.A > 0.9, s
            assert set(s.transfer_by_category) == set(CATS)
        elif kind in ("category", "noise", "step_flip"):
            assert abs(s.T - 0.5) < 0.12, s
    cat = report.score("double.4.img")
    assert cat.A > 0.9 and cat.S_category < 0.3 and cat.S_step > 0.8  # the fixed-layer trap
    assert not cat.useful


def test_step_instability_is_caught(report):
    flip, rot, noise = report.score("double.1.txt"), report.score("single.0.img"), report.score("single.2.img")
    assert flip.S_step < 0.2 and rot.S_step < 0.3
    assert rot.S_category > 0.8  # stable across categories, not across steps
    assert noise.S < 0.3 and abs(noise.A - 0.5) < 0.12
    worst_shared = min(report.score(n).R for n, (k, _) in KINDS.items() if k == "shared")
    assert max(flip.R, rot.R, noise.R, report.score("double.4.img").R) < worst_shared


def test_best_fixed_is_highest_separability(report):
    assert report.best_fixed == max(report.scores, key=lambda s: s.A).name == "double.4.img"
    assert report.best_fixed not in report.selected


def test_selection_is_diverse(report):
    sel = report.selected
    assert len(sel) == 3
    assert {"single.4.img", "double.4.txt"} <= set(sel)
    assert len({"double.1.img", "double.2.img"} & set(sel)) == 1  # neighbours: gap rule
    assert len({report.score(n).group for n in sel}) == 3
    assert all(p["pass"] == 1 for p in report.selection)
    assert report.transfer_mode == "leave-one-category-out"
    assert report.step_bins == [[0, 2], [4, 6], [8, 10]]


def test_target_prompts_are_never_read():
    store = make_store()
    rep = route(store, k=3)
    src = {i for i, r in enumerate(store.prompts) if r.domain == "source"}
    assert store.asked and all(a is not None and set(a) == src for a in store.asked)
    # a store that ignores the filter gives the same report: routing drops target rows itself
    leaky = make_store()
    leaky.pooled = lambda p, prompts=None: FakeStore.pooled(leaky, p, None)
    assert route(leaky, k=3).to_json() == rep.to_json()
    # the noise position carries a huge target-only signal; it must stay at chance
    assert abs(rep.score("single.2.img").A - 0.5) < 0.12


def test_ridge_probe_and_min_statistic():
    rep = route(make_store(kinds={n: KINDS[n] for n in ("double.1.img", "double.4.img", "single.2.img")}), k=1,
                config=RoutingConfig(probe="ridge", transfer_stat="min"))
    assert rep.selected == ["double.1.img"]
    assert rep.score("double.1.img").T > 0.9 and abs(rep.score("double.4.img").T - 0.5) < 0.15


# ------------------------------------------------------------------------------------- diversity rule

def ps(name, R, useful=True, group=None, layout=LAYOUT):
    from safedig_core.positions import block_number as _block
    from safedig_core.positions import depth
    from safedig_core.positions import group as grp

    p = parse(name)
    return PositionScore(name, p.stream, group or grp(p, layout), depth(p, layout), _block(p, layout), R, R, R,
                         R, R, R, R, {}, useful, 1, 1)


def test_group_cap():
    cands = [ps(f"double.{i}.img", 0.99 - 0.01 * i) for i in (0, 3, 5)] + [ps(f"single.{i}.img", 0.9 - 0.01 * i)
                                                                          for i in (1, 4)]
    cands += [ps("double.0.txt", 0.7)]
    names, _, notes = select_positions(cands, k=4, min_gap=2)
    groups = [c.group for c in cands if c.name in names]
    assert max(groups.count(g) for g in set(groups)) <= 2
    assert names == ["double.0.img", "double.3.img", "single.1.img", "single.4.img"]
    assert not notes


def test_cap_lifted_only_when_other_groups_have_nothing_useful():
    cands = [ps(f"double.{i}.img", 0.99 - 0.01 * i) for i in (0, 3, 5)] + [ps("double.0.txt", 0.95, useful=False)]
    names, picks, notes = select_positions(cands, k=3, min_gap=1)
    assert names == ["double.0.img", "double.3.img", "double.5.img"]
    assert [p["pass"] for p in picks] == [1, 1, 2]
    assert any("cap lifted" in n for n in notes)


def test_gap_is_per_stream_and_spans_double_single():
    cands = [ps("double.5.img", 0.99), ps("single.0.img", 0.98), ps("double.5.txt", 0.97), ps("single.3.img", 0.5)]
    names, picks, _ = select_positions(cands, k=3, min_gap=2)
    # double.5 and single.0 are consecutive blocks (6 double blocks); txt is another stream
    assert names == ["double.5.img", "double.5.txt", "single.3.img"]
    assert picks[-1]["pass"] == 1


def test_relaxations_when_too_few_positions():
    cands = [ps("double.0.img", 0.9), ps("double.1.img", 0.8, useful=False)]
    names, picks, notes = select_positions(cands, k=2, min_gap=2)
    assert names == ["double.0.img", "double.1.img"] and picks[1]["pass"] == 4 and notes


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.sampled_from(["img", "txt"]), st.floats(0, 1), st.booleans()),
                min_size=1, max_size=24, unique_by=lambda t: (t[0], t[1])), st.integers(1, 6), st.integers(0, 3))
def test_selection_properties(rows, k, gap):
    cands = [ps(f"{'double' if b < 6 else 'single'}.{b % 6}.{s}", r, u) for b, s, r, u in rows]
    names, picks, _ = select_positions(cands, k=k, min_gap=gap)
    assert len(names) == len(set(names)) == min(k, len(cands))
    by = {c.name: c for c in cands}
    strict = [by[p["name"]] for p in picks if p["pass"] < 4]
    for a in strict:
        for b in strict:
            assert a is b or a.stream != b.stream or abs(a.block - b.block) > gap
    first = [by[p["name"]] for p in picks if p["pass"] == 1]
    assert all(sum(c.group == g for c in first) <= math.ceil(k / 2) for g in {c.group for c in first})
    assert all(c.useful for c in first)
    # pass 1 takes candidates in score order: nothing admissible and better was skipped
    if picks and picks[0]["pass"] == 1:
        assert picks[0]["name"] == min([c for c in cands if c.useful], key=lambda c: (-c.R, -c.A, c.name)).name


# ------------------------------------------------------------------------------------------- outputs

def test_json_round_trip(report):
    text = report.to_json()
    back = RoutingReport.from_json(text)
    assert back == report
    assert back.to_json() == text
    assert json.loads(text)["best_fixed"] == report.best_fixed


def test_png_is_written(report, tmp_path):
    js, png = report.save(str(tmp_path))
    assert (tmp_path / "routing.png").stat().st_size > 10_000
    with open(js) as f:
        assert RoutingReport.from_json(f.read()) == report
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_route(tmp_path, monkeypatch, capsys):
    store = make_store(kinds={n: KINDS[n] for n in ("double.1.img", "double.4.txt", "single.2.img")})
    import safedig_core.formats.store as store_module

    monkeypatch.setattr(store_module, "ActivationStore", lambda path: store)
    assert cli.main(["route", "somewhere", "--top", "2", "--out", str(tmp_path)]) == 0
    rep = RoutingReport.from_json((tmp_path / "routing.json").read_text())
    assert rep.selected == ["double.1.img", "double.4.txt"]
    assert (tmp_path / "routing.png").stat().st_size > 0
    assert "double.1.img" in capsys.readouterr().out
    assert cli.main(["route", "somewhere", "--top", "2", "--out", str(tmp_path), "--positions", "joint.0.img"]) == 2
    assert "position joint.0.img is not in the store" in capsys.readouterr().err
    assert cli.main(["route", "somewhere", "--top", "2", "--out", str(tmp_path), "--weights", "1,2"]) == 2
    assert "--weights: '1,2': expected 3 comma-separated numbers" in capsys.readouterr().err


def test_cli_route_on_a_real_store(tmp_path, capsys):
    """End to end through `safedig_core.formats.store`: write the synthetic data with StoreWriter, route from disk."""
    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.formats.store import StoreWriter

    fake = make_store(kinds={n: KINDS[n] for n in ("double.1.img", "double.4.img", "double.4.txt")}, d=16)
    prompts = [PromptRecord(r.id, r.prompt, r.label, r.category, r.domain) for r in fake.prompts]
    names = [str(p) for p in fake.positions]
    with StoreWriter(str(tmp_path / "store"), "flux", names, {n: 16 for n in names}, prompts,
                     {"record_steps": STEPS}, prompts_per_shard=32) as w:
        for i in range(len(prompts)):
            got = {p: fake.pooled(p, [i]) for p in fake.positions}
            w.add(i, {str(p): (g.x, g.step, torch.zeros_like(g.step)) for p, g in got.items()},
                  {str(p): (g.x, g.step) for p, g in got.items()})
    out = tmp_path / "out"
    assert cli.main(["route", str(tmp_path / "store"), "--top", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    rep = RoutingReport.from_json((out / "routing.json").read_text())
    assert rep.selected == ["double.1.img", "double.4.txt"] and rep.best_fixed == "double.4.img"
    assert (out / "routing.png").stat().st_size > 10_000


# -------------------------------------------------------------------------------------------- errors

SMALL = {"double.1.img": ("shared", 3.5), "single.2.img": ("noise", 0.0)}


def test_no_unsafe_source_prompts():
    prompts = [r for r in make_prompts() if not (r.label == "unsafe" and r.domain == "source")]
    with pytest.raises(RoutingError, match="no unsafe source prompts"):
        route(make_store(prompts, kinds=SMALL), k=1)


def test_no_source_prompts_at_all():
    prompts = [r for r in make_prompts() if r.domain == "target"]
    with pytest.raises(RoutingError, match="no source-domain prompts"):
        route(make_store(prompts, kinds=SMALL), k=1)


def test_no_safe_source_prompts():
    prompts = [r for r in make_prompts() if not (r.label == "safe" and r.domain == "source")]
    with pytest.raises(RoutingError, match="no safe source prompts"):
        route(make_store(prompts, kinds=SMALL), k=1)


def test_single_category_falls_back_or_raises():
    store = make_store(make_prompts(cats=["nudity"], n_unsafe=20), kinds=SMALL)
    rep = route(store, k=1)
    assert rep.transfer_mode == "within-category split"
    assert any("at least 2 source unsafe categories" in n for n in rep.notes)
    assert rep.score("double.1.img").T == rep.score("double.1.img").A > 0.9
    assert rep.score("double.1.img").S_category is None and rep.score("double.1.img").S_step is not None
    with pytest.raises(RoutingError, match="at least 2 source unsafe categories"):
        route(store, k=1, config=RoutingConfig(fallback="raise"))


def test_missing_position():
    with pytest.raises(RoutingError, match=r"position single\.9\.img is not in the store \(it has: double\.1\.img"):
        route(make_store(kinds=SMALL), k=1, positions=["single.9.img"])


def test_nan_activations_named():
    store = make_store(kinds=SMALL)
    x = store._data[parse("single.2.img")][0]
    x[5, 3] = float("nan")  # row 5 is prompt 0 ("s0")
    with pytest.raises(RoutingError, match=r"single\.2\.img: NaN or inf .*prompts s0"):
        route(store, k=1)


def test_bad_arguments():
    with pytest.raises(RoutingError, match="at least 1"):
        route(make_store(kinds=SMALL), k=0)
    with pytest.raises(RoutingError, match="weights"):
        route(make_store(kinds=SMALL), k=1, config=RoutingConfig(w_transfer=-1))


def test_single_step_store():
    rep = route(make_store(kinds=SMALL, steps=[5]), k=1)
    s = rep.score("double.1.img")
    assert s.S_step is None and s.S_category is not None and rep.selected == ["double.1.img"]
    assert any("one recorded sampler step" in n for n in rep.notes)
