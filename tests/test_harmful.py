"""Harmful-latent scoring (safedig_core.pipeline.harmful) on planted data: an SAE whose latents are known
orthonormal features, and prompts whose unsafe categories switch specific features on."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from safedig_core.formats.dictionary import DictionaryEntry, SafetyDictionary, load, save
from safedig_core.pipeline.data import MemorySource
from safedig_core.pipeline.harmful import (
    HarmfulConfig,
    HarmfulError,
    collect_stats,
    find_harmful,
    select_latents,
)
from safedig_core.positions import parse
from safedig_core.sae import SparseAutoencoder


@dataclass
class Rec:  # PromptRecord-like: scoring reads label, category and domain only
    label: str
    category: str = ""
    domain: str = "source"


D, ROWS = 64, 400
NUDITY, VIOLENCE, CONFOUND, RARE, SPARSE, TARGET_ONLY = (50, 51), (52, 53), 54, 55, 56, 62


def planted_prompts():
    return ([Rec("safe") for _ in range(10)] + [Rec("unsafe", "nudity") for _ in range(5)]
            + [Rec("unsafe", "violence") for _ in range(5)] + [Rec("unsafe", "implicit", "target") for _ in range(5)]
            + [Rec("safe", "", "target") for _ in range(2)])


def planted_data(prompts, seed=0):
    """Rows: 3 benign features (0..49) each; category features switched on by the prompt's category."""
    g = torch.Generator().manual_seed(seed)
    xs, pr = [], []
    for i, r in enumerate(prompts):
        Z = torch.zeros(ROWS, D)
        idx = torch.rand(ROWS, 50, generator=g).argsort(1)[:, :3]
        Z.scatter_(1, idx, torch.rand(ROWS, 3, generator=g) + 0.5)

        def on(j, p, Z=Z):
            m = torch.rand(ROWS, generator=g) < p
            Z[m, j] = torch.rand(int(m.sum()), generator=g) + 0.5

        unsafe = r.label == "unsafe"
        on(CONFOUND, 0.6 if unsafe else 0.3)  # more on unsafe, but common on safe: not specific
        if r.category == "nudity":
            on(NUDITY[0], 0.4), on(NUDITY[1], 0.4), on(SPARSE, 0.06)
        if r.category == "violence":
            on(VIOLENCE[0], 0.4), on(VIOLENCE[1], 0.4)
        if r.category in ("nudity", "violence"):
            on(RARE, 0.005)  # below the 1 % frequency floor
        if r.category == "implicit":
            on(TARGET_ONLY, 0.5)
        xs.append(Z + 0.01 * torch.randn(ROWS, D, generator=g))
        pr.append(torch.full((ROWS,), i))
    return MemorySource(torch.cat(xs), prompt=torch.cat(pr), prompts=prompts)


@pytest.fixture(scope="module")
def sae():
    """Latent j reads and writes feature j exactly (orthonormal = identity basis here)."""
    s = SparseAutoencoder(D, D, k=8)
    with torch.no_grad():
        s.W_enc.copy_(torch.eye(D))
        s.W_dec.copy_(torch.eye(D))
    return s


@pytest.fixture(scope="module")
def data():
    return planted_data(planted_prompts())


@pytest.fixture(scope="module")
def stats(sae, data):
    return collect_stats(sae, data)


def test_planted_harmful_features_rank_first(sae, data):
    res = find_harmful(sae, data)
    print("harmful", res.indices, [round(s, 3) for s in res.scores], res.tokens)
    assert set(res.indices[:4]) == set(NUDITY + VIOLENCE)
    assert CONFOUND not in res.indices  # fires on 30 % of safe tokens: fails safe specificity
    assert RARE not in res.indices and TARGET_ONLY not in res.indices  # floor; other domain
    assert all(a >= b for a, b in zip(res.scores, res.scores[1:]))
    assert all(s >= HarmfulConfig().threshold for s in res.scores)
    assert all(0 <= v < 0.01 for v in res.safe_values[:4])  # only noise-level codes on safe tokens
    assert res.tokens == {"safe": 4000, "unsafe": 4000, "nudity": 2000, "violence": 2000}


def test_per_category_and_overall_scores(stats):
    res = select_latents(stats)
    nud, vio = res.per_category["nudity"], res.per_category["violence"]
    for j in NUDITY:
        assert nud[j] > 0.5 and vio[j] == 0.0 and 0 < res.overall[j] < nud[j]
    for j in VIOLENCE:
        assert vio[j] > 0.5 and nud[j] == 0.0
    assert res.overall[CONFOUND] == 0.0 and float(res.unsafe_rate[CONFOUND]) > float(res.safe_rate[CONFOUND]) > 0.25
    cats = res.category_scores()
    assert set(cats) == {"nudity", "violence"} and all(len(v) == len(res.indices) for v in cats.values())
    json.dumps(res.metadata())
    # a latent specific to one category qualifies through that category even if the pooled score is low
    low = select_latents(stats, HarmfulConfig(threshold=0.0))
    assert SPARSE in low.indices and RARE not in low.indices
    assert SPARSE not in select_latents(stats, HarmfulConfig(threshold=0.0, per_category=False, min_unsafe_rate=0.04)).indices


def test_streaming_sums_do_not_depend_on_batching(sae, data, stats):
    a = collect_stats(sae, data, batch_size=333)
    b = stats  # batch size 4096
    for name in ("n", "s1", "s2", "fires"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-9), name
    assert select_latents(a).indices == select_latents(b).indices


def test_target_domain_scoring(sae, data):
    res = find_harmful(sae, data, domain="target")
    assert res.indices[0] == TARGET_ONLY and res.tokens["unsafe"] == 2000


def test_all_safe_data_is_refused(sae):
    prompts = [Rec("safe") for _ in range(4)]
    with pytest.raises(HarmfulError, match=r"no unsafe prompts in the source domain \(all-safe data\)"):
        find_harmful(sae, planted_data(prompts))
    # unsafe prompts exist but none of their rows were collected at this position
    prompts = [Rec("safe"), Rec("safe"), Rec("unsafe", "nudity")]
    src = planted_data(prompts)
    keep = src.prompt != 2
    with pytest.raises(HarmfulError, match="no unsafe rows in the source domain"):
        find_harmful(sae, MemorySource(src.x[keep], src.prompt[keep], prompts=prompts))
    with pytest.raises(HarmfulError, match="no safe prompts"):
        find_harmful(sae, planted_data([Rec("unsafe", "x")]))
    with pytest.raises(HarmfulError, match="prompt records"):
        find_harmful(sae, MemorySource(src.x))


def test_scores_round_trip_through_the_dictionary(sae, stats, tmp_path):
    res = select_latents(stats)
    p = parse("double.0.img")
    entry = DictionaryEntry(p, sae, res.indices, res.scores, res.safe_values, {"fvu": 0.1, **res.metadata()})
    save(SafetyDictionary("flux", {p: entry}), str(tmp_path / "d.safetensors"))
    back = load(str(tmp_path / "d.safetensors")).entries[p]
    assert back.harmful == res.indices and back.scores == pytest.approx(res.scores)
    assert back.metrics["harmful_by_category"] == res.category_scores()
