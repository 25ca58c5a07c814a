"""Encoder-frozen decoder adaptation (safedig_core.pipeline.adapt) on a synthetic shifted domain.

Source: tokens are sparse non-negative combinations of 48 benign directions, and a quarter of them also
carry one of 16 harmful directions. Target (the shifted risk domain): the same benign directions, more
than half the tokens carrying one of 8 harmful directions *rotated by 25°*, and two new directions
that the source never had. The encoder stays frozen; the decoder should follow the target."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from safedig_core.pipeline.adapt import AdaptConfig, AdaptError, adapt_decoder, rescore_harmful
from safedig_core.pipeline.data import MemorySource, TrainError
from safedig_core.pipeline.train import TrainConfig, train_sae
from safedig_core.sae import SparseAutoencoder

d, BENIGN, HARM = 32, 48, 16
ROTATED = list(range(BENIGN, BENIGN + 8))


@dataclass
class Rec:
    label: str
    category: str = ""
    domain: str = "target"


def sample(n, dirs, harmful, p_unsafe, g, new=None, p_new=0.0):
    """Rows and whether each carries a harmful direction."""
    idx = torch.rand(n, BENIGN, generator=g).argsort(1)[:, :3]
    Z = torch.zeros(n, dirs.shape[0]).scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    unsafe = torch.rand(n, generator=g) < p_unsafe
    h = torch.tensor(harmful)[torch.randint(len(harmful), (n,), generator=g)]
    Z[unsafe, h[unsafe]] = torch.rand(int(unsafe.sum()), generator=g) + 0.5
    X = Z @ dirs + 0.01 * torch.randn(n, d, generator=g)
    if new is not None:
        on = (torch.rand(n, len(new), generator=g) < p_new).float() * (torch.rand(n, len(new), generator=g) + 0.5)
        X = X + on @ new
    return X, unsafe


@pytest.fixture(scope="module")
def domains():
    g = torch.Generator().manual_seed(7)  # not the SAE's init seed
    D = torch.randn(BENIGN + HARM, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    Xs, _ = sample(16384, D, list(range(BENIGN, BENIGN + HARM)), 0.25, g)
    Dt = D.clone()
    for i in ROTATED:
        r = torch.randn(d, generator=g)
        r -= (r @ D[i]) * D[i]
        Dt[i] = math.cos(math.radians(25)) * D[i] + math.sin(math.radians(25)) * r / r.norm()
    new = torch.randn(2, d, generator=g)
    new /= new.norm(dim=1, keepdim=True)
    Xt, unsafe_t = sample(4096, Dt, ROTATED, 0.6, g, new=new, p_new=0.1)
    sae = train_sae(Xs, TrainConfig(latents=128, k=4, steps=600, batch_size=256, dead_tokens=10_000)).sae
    cos = D[ROTATED] @ sae.W_dec.detach().t()
    learned = [i for i, c in zip(ROTATED, cos) if c.max() >= 0.9]  # rotated directions the SAE learned
    harmful = [int(c.argmax()) for c in cos if c.max() >= 0.9]  # and their latents
    assert len(harmful) >= 4
    # Dt: the rotated directions of the harmful latents, in the same order
    return SimpleNamespace(Xs=Xs, Xt=Xt, unsafe_t=unsafe_t, sae=sae, harmful=harmful, Dt=Dt[learned])


@pytest.fixture(scope="module")
def adapted(domains):
    dm = domains
    before = {k: v.clone() for k, v in dm.sae.state_dict().items()}
    res = adapt_decoder(dm.sae, dm.Xt, dm.Xs, AdaptConfig(steps=300, batch_size=256, log_every=25),
                        harmful=dm.harmful)
    return before, res


def test_adaptation_lowers_target_fvu_and_keeps_source(adapted):
    res = adapted[1]
    m = res.metrics
    print({k: round(v, 4) for k, v in m.items()})
    assert m["target_fvu_after"] < 0.93 * m["target_fvu_before"]
    assert m["source_fvu_after"] <= 1.05 * m["source_fvu_before"]  # source FVU within 5 % (relative)
    assert m["source_retention"] == pytest.approx(m["source_fvu_after"] / m["source_fvu_before"])
    assert 0 < m["harmful_drift_mean"] <= m["harmful_drift_max"] < 1
    assert m["harmful_drift_mean"] > 3 * m["decoder_drift_mean"]  # the rotated rows moved most
    assert res.history and not res.stopped


def test_harmful_rows_turn_toward_the_rotated_directions(adapted, domains):
    res, h = adapted[1], domains.harmful
    cos = torch.nn.functional.cosine_similarity
    old = cos(domains.sae.W_dec.detach()[h], domains.Dt, dim=1)
    new = cos(res.sae.W_dec.detach()[h], domains.Dt, dim=1)
    assert (new > old).all(), (old, new)


def test_encoder_is_bit_identical(adapted, domains):
    sae = domains.sae
    before, res = adapted
    assert torch.equal(res.sae.W_enc, before["W_enc"]) and torch.equal(res.sae.b_enc, before["b_enc"])
    assert torch.equal(res.sae.scale, before["scale"])
    for k, v in sae.state_dict().items():  # the input SAE is left as it was
        assert torch.equal(v, before[k]), k
    assert not torch.equal(res.sae.W_dec, before["W_dec"])
    norms = res.sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_fixed_bias_keeps_the_encoder_function(domains):
    sae = domains.sae
    res = adapt_decoder(sae, domains.Xt[:1024], None, AdaptConfig(steps=20, batch_size=256, train_bias=False))
    assert torch.equal(res.sae.b_dec, sae.b_dec) and res.metrics["b_dec_shift"] == 0.0
    x = domains.Xt[:64]
    assert torch.equal(res.sae.encode(x), sae.encode(x))
    assert "source_fvu_after" not in res.metrics


def test_an_unmeetable_source_bound_caps_the_replay_weight(domains):
    """A retention bound the data cannot meet used to drive μ to overflow (NaN decoders); μ now stops at
    max_replay and the result stays finite."""
    source = domains.Xs[:2048] + 3.0 * torch.randn(2048, domains.Xs.shape[1], generator=torch.Generator().manual_seed(1))
    cfg = AdaptConfig(steps=60, batch_size=256, retention=1e-6, dual_lr=1e3, max_replay=1e3, anchor=0.0)
    res = adapt_decoder(domains.sae, domains.Xt[:2048], source, cfg)
    assert torch.isfinite(res.sae.W_dec).all() and math.isfinite(res.metrics["target_fvu_after"])
    assert 1.0 <= res.metrics["replay_weight_final"] <= 1e3 + 1e-6


def test_rescore_on_target(adapted, domains):
    res, harmful, Xt = adapted[1], domains.harmful, domains.Xt
    # one "prompt" per row: unsafe when the row carries a rotated harmful direction
    prompts = [Rec("unsafe" if u else "safe", "implicit" if u else "") for u in domains.unsafe_t.tolist()]
    data = MemorySource(Xt, prompt=torch.arange(len(Xt)), prompts=prompts)
    kept = rescore_harmful(res.sae, data, None, harmful, mode="rescore")
    assert kept.indices == harmful and all(s > 0 for s in kept.scores)
    fresh = rescore_harmful(res.sae, data, None, harmful, mode="reselect")
    assert set(harmful) <= set(fresh.indices)
    with pytest.raises(AdaptError, match="unknown rescore mode"):
        rescore_harmful(res.sae, data, None, harmful, mode="bogus")


def test_bad_input_is_refused(domains):
    sae = domains.sae
    with pytest.raises(AdaptError, match="no target activations"):
        adapt_decoder(sae, torch.zeros(0, d), None, AdaptConfig(steps=2))
    with pytest.raises(TrainError, match="width 31 does not match"):
        adapt_decoder(sae, torch.randn(64, 31), None, AdaptConfig(steps=2))
    bad = domains.Xt[:256].clone()
    bad[3, 3] = float("nan")
    with pytest.raises(TrainError, match="NaN"):
        adapt_decoder(sae, bad, None, AdaptConfig(steps=2))
    with pytest.raises(AdaptError, match="TopK"):
        adapt_decoder(SparseAutoencoder(d, 64, activation="relu"), torch.randn(64, d), None, AdaptConfig(steps=2))


# --- `safedig train` → `safedig adapt` through a real activation store ---------------------------------

def test_cli_train_then_adapt_through_a_store(tmp_path, capsys):
    from safedig_core.cli import main
    from safedig_core.formats import dictionary
    from safedig_core.formats.prompts import PromptRecord
    from safedig_core.formats.store import StoreWriter

    pos, w, rows = ["double.0.img", "single.1.txt"], 16, 96
    g = torch.Generator().manual_seed(3)
    dirs = torch.randn(24, w, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    recs = ([PromptRecord(f"s{i}", "a cat", "safe", "", "source") for i in range(6)]
            + [PromptRecord(f"u{i}", "bad", "unsafe", "gore", "source") for i in range(6)]
            + [PromptRecord(f"t{i}", "implicit", "unsafe", "gore", "target") for i in range(3)]
            + [PromptRecord(f"ts{i}", "a dog", "safe", "", "target") for i in range(3)])
    path = str(tmp_path / "store")
    with StoreWriter(path, "flux", pos, {p: w for p in pos}, recs, {"test": 1}, prompts_per_shard=4) as sw:
        for i, r in enumerate(recs):
            out = {}
            for p in pos:
                Z = torch.zeros(rows, 24).scatter_(1, torch.randint(20, (rows, 2), generator=g),
                                                   torch.rand(rows, 2, generator=g) + 0.5)
                if r.label == "unsafe":
                    Z[:, 20 + (r.domain == "target")] = (torch.rand(rows, generator=g) < 0.5).float()
                out[p] = (Z @ dirs + 0.01 * torch.randn(rows, w, generator=g), torch.zeros(rows), torch.arange(rows))
            sw.add(i, out, {p: (out[p][0].mean(0, keepdim=True), torch.zeros(1)) for p in pos})
    out = tmp_path / "train"
    args = ["train", path, "--out", str(out), "--latents", "48", "--k", "4", "--steps", "60", "--batch-size", "128",
            "--checkpoint-every", "25", "--dead-tokens", "2000", "--eval-batches", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "double.0.img: FVU" in printed and "harmful latents" in printed
    d = dictionary.load(str(out / "dictionary.safetensors"))
    assert [str(p) for p in d.positions] == pos and d.provenance["partial"] is False
    for e in d.entries.values():
        assert e.harmful and e.metrics["train_steps"] == 60 and 0 <= e.metrics["dead_frac"] <= 1
        assert "gore" in e.metrics["harmful_by_category"]
    assert sorted(os.listdir(out)) == sorted(["dictionary.safetensors"] + [f"{p}.{x}" for p in pos
                                                                            for x in ("ckpt.safetensors", "log.jsonl")])
    assert main(args) == 0  # finished checkpoints: resumes to the same dictionary at once
    again = dictionary.load(str(out / "dictionary.safetensors"))
    assert all(torch.equal(again.entries[p].sae.W_dec, d.entries[p].sae.W_dec) for p in d.positions)

    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", str(out / "dictionary.safetensors"), path, "--out", str(adapted), "--steps", "30",
                 "--batch-size", "128", "--rescore", "union", "--positions", "single.1.txt"]) == 0
    assert "single.1.txt: target FVU" in capsys.readouterr().out
    a = dictionary.load(str(adapted))
    e, e0 = a.entries[parse_pos("single.1.txt")], d.entries[parse_pos("single.1.txt")]
    assert a.provenance["adapted"] == "single.1.txt" and "target_fvu_after" in e.metrics
    assert torch.equal(e.sae.W_enc, e0.sae.W_enc) and not torch.equal(e.sae.W_dec, e0.sae.W_dec)
    assert set(e0.harmful) <= set(e.harmful)
    assert torch.equal(a.entries[parse_pos("double.0.img")].sae.W_dec, d.entries[parse_pos("double.0.img")].sae.W_dec)
    # interruption: the running position checkpoints and stops; the finished ones are in the dictionary
    from safedig_core.formats.store import ActivationStore
    from safedig_core.pipeline.checkpoint import read_checkpoint
    from safedig_core.pipeline.train import TrainConfig as TC
    from safedig_core.pipeline.train import train_store

    calls = []
    with pytest.raises(KeyboardInterrupt):
        train_store(ActivationStore(path), str(tmp_path / "t2"), None, TC(latents=48, k=4, steps=20, batch_size=128),
                    progress=False, should_stop=lambda: (calls.append(1), len(calls) > 25)[1])
    # polled after steps 1..19 of the first position (not after its last), then steps 1..7 of the second
    assert read_checkpoint(str(tmp_path / "t2" / "single.1.txt.ckpt.safetensors"))[0]["step"] == 7
    part = dictionary.load(str(tmp_path / "t2" / "dictionary.safetensors"))
    assert [str(p) for p in part.positions] == ["double.0.img"] and part.provenance["partial"] is True
    # clear one-line errors
    assert main(["train", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "no such activation store" in capsys.readouterr().err
    assert main(["train", path, "--out", str(out), "--positions", "joint.0.img"]) == 2
    capsys.readouterr()


def parse_pos(name):
    from safedig_core.positions import parse

    return parse(name)


def test_guarded_union_admits_only_latents_that_keep_the_gate_separation():
    """`guarded` adds a target-selected latent only where the per-image AUROC of unsafe against safe source
    prompts does not fall: one that fires more on safe images is left out, one that reads the unsafe images the
    kept set missed is let in, one that never fires changes nothing and is let in."""
    from safedig_core.pipeline.adapt import guarded_union
    from safedig_core.pipeline.harmful import harmful_peaks
    from safedig_core.pipeline.routing.scores import auroc
    from safedig_core.steering import PositionSteerer

    sae = SparseAutoencoder(4, 4, 4, "topk")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    g = torch.Generator().manual_seed(3)
    kinds = ["safe"] * 8 + ["unsafe_a"] * 6 + ["unsafe_b"] * 6
    rows, prompt, records = [], [], []
    for i, kind in enumerate(kinds):
        x = torch.zeros(3, 4)  # three tokens per image
        x[:, 1] = torch.rand(3, generator=g) + (1.0 if kind == "safe" else 0.2)  # latent 1: safe images more
        if kind == "unsafe_a":
            x[0, 0] = 2.0  # latent 0 (already harmful) reads these
        if kind == "unsafe_b":
            x[1, 2] = 2.0  # latent 2 reads the ones latent 0 misses
        rows.append(x)
        prompt += [i] * 3
        records.append(Rec("safe" if kind == "safe" else "unsafe", domain="source" if i % 2 else "target"))
    records = [Rec(r.label, domain="source") if r.label == "safe" else r for r in records]
    data = MemorySource(torch.cat(rows), prompt=torch.tensor(prompt), prompts=records)
    kept = guarded_union(sae, data, None, [0], [1, 2, 3], position=None)
    assert kept == [0, 2, 3]

    def separation(latents):
        st = PositionSteerer(sae, torch.tensor(latents))
        safe = [i for i, r in enumerate(records) if r.label == "safe"]
        unsafe = [i for i, r in enumerate(records) if r.label == "unsafe"]
        return auroc(harmful_peaks(data, None, st, unsafe)[1], harmful_peaks(data, None, st, safe)[1])

    assert separation([0, 1]) < separation([0]) < separation(kept) == 1.0
