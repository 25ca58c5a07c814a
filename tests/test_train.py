"""TopK SAE training (safedig_core.pipeline.train): it learns planted features, resumes bit for bit after
SIGKILL, and refuses bad input with a clear message. Synthetic, in-memory data; CPU; seconds."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from safedig_core.pipeline.checkpoint import load_checkpoint_sae, read_checkpoint
from safedig_core.pipeline.data import MemorySource, TrainError
from safedig_core.pipeline.metrics import sae_quality as evaluate
from safedig_core.pipeline.metrics import splice, spliced_error
from safedig_core.pipeline.train import TrainConfig, train_sae
from safedig_core.sae import SparseAutoencoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def planted(n=16384, d=32, features=64, active=3, seed=101, noise=0.01):
    """Tokens that are sparse non-negative combinations of `active` of `features` unit directions in
    R^d (more directions than dimensions: superposition), plus a little noise, an offset and a scale.
    The seed must differ from the SAE's init seed, or the init would contain the planted directions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, features, generator=g).argsort(1)[:, :active]
    Z = torch.zeros(n, features).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    X = Z @ D + noise * torch.randn(n, d, generator=g) + 0.3
    return 4.0 * X, D


def recovery(D: torch.Tensor, W_dec: torch.Tensor, at: float = 0.9) -> tuple[float, torch.Tensor]:
    """Fraction of planted directions whose best decoder row has cosine ≥ `at`, and those cosines."""
    cos = (D @ (W_dec / W_dec.norm(dim=1, keepdim=True)).t()).max(1).values
    return float((cos >= at).float().mean()), cos


@pytest.fixture(scope="module")
def trained():
    X, D = planted()
    cfg = TrainConfig(latents=128, k=4, steps=600, batch_size=256, dead_tokens=10_000, log_every=50)
    init = SparseAutoencoder.init_random(32, 128, 4, generator=torch.Generator().manual_seed(cfg.seed))
    return X, D, cfg, init, train_sae(X, cfg)


def test_recovers_planted_features(trained):
    _, D, _, init, res = trained
    rate, cos = recovery(D, res.sae.W_dec.detach())
    rate0, _ = recovery(D, init.W_dec)
    print(f"recovered {rate:.3f} of planted directions (min cos {float(cos.min()):.3f}); random init: {rate0:.3f}")
    assert rate0 < 0.2  # the check has teeth: random unit rows do not pass it
    assert rate >= 0.9, f"only {rate:.2%} of planted directions recovered at cos ≥ 0.9 (cosines {cos.tolist()})"


def test_fvu_drops_and_metrics_reported(trained):
    X, _, cfg, init, res = trained
    # scale: E‖x·s‖² = d on the estimation batches (≈ on all data); b_dec starts at the scaled mean
    s = float(res.sae.scale)
    assert abs(float((X * s).pow(2).sum(1).mean()) / 32 - 1) < 0.05
    init.scale.fill_(s)
    with torch.no_grad():
        init.b_dec.copy_((X * s).mean(0))
    before, after = evaluate(init, X), evaluate(res.sae, X)
    print(f"FVU {before['fvu']:.3f} at init -> {after['fvu']:.4f} trained; L0 {after['l0']}, "
          f"never-fired {after['dead_frac']:.3f}; last window {res.metrics}")
    assert after["fvu"] < 0.1 < before["fvu"]
    assert res.history[-1]["fvu"] < 0.5 * res.history[0]["fvu"]
    assert 0 < after["l0"] <= cfg.k
    m = res.metrics
    assert set(m) >= {"fvu", "auxk", "l0", "dead_frac", "step", "tokens", "lr", "scale"}
    assert 0.0 <= m["dead_frac"] <= 1.0 and m["step"] == cfg.steps == res.history[-1]["step"]
    assert len(res.history) == cfg.steps // cfg.log_every
    norms = res.sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_dead_latents_get_auxk(tmp_path):
    """Many latents for few features: some die; AuxK is active and the dead fraction is reported."""
    X, _ = planted(n=4096, features=16)
    res = train_sae(X, TrainConfig(latents=256, k=2, steps=120, batch_size=256, dead_tokens=2048, log_every=20))
    assert any(h["dead_frac"] > 0 for h in res.history)
    assert any(h["auxk"] > 0 for h in res.history)


def test_should_stop_then_resume_is_bit_exact(tmp_path):
    X, _ = planted(n=2048)
    cfg = TrainConfig(latents=64, k=4, steps=60, batch_size=128, dead_tokens=1000, log_every=7, checkpoint_every=9)
    full = train_sae(X, cfg, checkpoint=str(tmp_path / "a.ckpt"), log=str(tmp_path / "a.jsonl"))
    calls = []
    part = train_sae(X, cfg, checkpoint=str(tmp_path / "b.ckpt"), log=str(tmp_path / "b.jsonl"),
                     should_stop=lambda: len(calls) >= 23, progress=lambda s, t, m: calls.append(s))
    assert part.stopped and part.metrics["step"] == 23 and read_checkpoint(str(tmp_path / "b.ckpt"))[0]["step"] == 23
    rest = train_sae(X, cfg, checkpoint=str(tmp_path / "b.ckpt"), log=str(tmp_path / "b.jsonl"))
    assert rest.resumed_from == 23 and not rest.stopped
    for name, t in full.sae.state_dict().items():
        assert torch.equal(t, rest.sae.state_dict()[name]), name
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert rest.history == full.history
    assert torch.equal(load_checkpoint_sae(str(tmp_path / "b.ckpt")).W_dec, full.sae.W_dec.detach())
    # a finished checkpoint resumes to the same SAE at once; a different config is refused
    again = train_sae(X, cfg, checkpoint=str(tmp_path / "b.ckpt"), log=str(tmp_path / "b.jsonl"))
    assert torch.equal(again.sae.W_dec, full.sae.W_dec)
    with pytest.raises(TrainError, match="different training config.*k"):
        train_sae(X, TrainConfig(**{**cfg.__dict__, "k": 3}), checkpoint=str(tmp_path / "b.ckpt"))


SIGKILL_CFG = {"latents": 96, "k": 4, "steps": 160, "batch_size": 128, "dead_tokens": 1500, "log_every": 10,
               "checkpoint_every": 30}
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train import SIGKILL_CFG, planted
    from safedig_core.pipeline.train import TrainConfig, train_sae
    print("ready", flush=True)
    train_sae(planted(n=4096)[0], TrainConfig(**SIGKILL_CFG), checkpoint=sys.argv[1], log=sys.argv[2],
              progress=lambda s, t, m: time.sleep(0.005))
""")


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """A subprocess is killed (SIGKILL) at a random moment after its first checkpoint; resuming from its
    files ends with the same model, optimizer state, counters and log as an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests")))
    ckpt, log = tmp_path / "kill.ckpt", tmp_path / "kill.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    victim = subprocess.Popen([sys.executable, str(script), str(ckpt), str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    X = planted(n=4096)[0]
    cfg = TrainConfig(**SIGKILL_CFG)
    ref = train_sae(X, cfg, checkpoint=str(tmp_path / "ref.ckpt"), log=str(tmp_path / "ref.jsonl"))  # meanwhile
    deadline = time.time() + 90
    while not ckpt.exists():
        assert victim.poll() is None, victim.communicate()[1].decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    wait = random.uniform(0.0, 0.5)  # a random moment: mid-step, mid-checkpoint or mid-log-line
    time.sleep(wait)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(str(ckpt))[0]["step"]
    assert killed_at < cfg.steps, f"the run finished before the kill ({wait:.2f} s after the first checkpoint)"
    res = train_sae(X, cfg, checkpoint=str(ckpt), log=str(log))
    assert res.resumed_from == killed_at
    a, b = read_checkpoint(str(tmp_path / "ref.ckpt")), read_checkpoint(str(ckpt))
    assert a[0]["step"] == b[0]["step"] == cfg.steps
    for name, t in a[1].items():
        if name.startswith(("model.", "opt.", "state.")):
            assert torch.equal(t, b[1][name]), f"{name} differs after a kill at step {killed_at} (+{wait:.2f} s)"
    for name, t in ref.sae.state_dict().items():
        assert torch.equal(t, res.sae.state_dict()[name]), name
    ra = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in log.read_text().splitlines()]
    assert ra == rb and len(ra) == cfg.steps // cfg.log_every
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# --- bad input ----------------------------------------------------------------------------------------

def test_nan_activations_are_refused():
    X, _ = planted(n=2048)
    X[5, 3] = float("nan")
    with pytest.raises(TrainError, match=r"epoch 0, batch 0: activations contain NaN or Inf \(first at row 5"):
        train_sae(X, TrainConfig(latents=64, k=4, steps=5, batch_size=256, shuffle=False))
    Y, _ = planted(n=2048)
    Y[1900, 0] = float("inf")  # past the scale-estimation batches: caught during training
    with pytest.raises(TrainError, match=r"epoch 0, batch 7: activations contain NaN or Inf"):
        train_sae(Y, TrainConfig(latents=64, k=4, steps=50, batch_size=256, scale_batches=2, shuffle=False))


def test_empty_source_is_refused():
    with pytest.raises(TrainError, match="no activations to train on"):
        train_sae(torch.zeros(0, 32), TrainConfig(latents=64, k=4, steps=5))
    with pytest.raises(TrainError, match="no activations to train on"):
        train_sae([], TrainConfig(latents=64, k=4, steps=5))
    src = MemorySource(planted(n=512)[0], prompt=torch.zeros(512))
    with pytest.raises(TrainError, match="no activations to train on"):  # no rows of the requested prompts
        train_sae(src, TrainConfig(latents=64, k=4, steps=5), prompts=[3, 4])


def test_width_mismatch_is_refused(tmp_path):
    X, _ = planted(n=1024)
    batches = [X[:256], X[256:512], torch.randn(256, 31)]
    with pytest.raises(TrainError, match="epoch 0, batch 2: activation width 31 does not match the expected width 32"):
        train_sae(batches, TrainConfig(latents=64, k=4, steps=10, scale_batches=2))
    ck = str(tmp_path / "c.ckpt")
    train_sae(X, TrainConfig(latents=64, k=4, steps=3, batch_size=256), checkpoint=ck)
    with pytest.raises(TrainError, match="checkpoint has width 32 but the data has width 16"):
        train_sae(MemorySource(torch.randn(256, 16)), TrainConfig(latents=64, k=4, steps=3), checkpoint=ck)


def test_bad_config_and_flat_data_are_refused():
    X, _ = planted(n=512)
    with pytest.raises(TrainError, match="k=200 must be in 1..64"):
        train_sae(X, TrainConfig(latents=64, k=200, steps=3))
    with pytest.raises(TrainError, match="do not vary"):
        train_sae(torch.ones(512, 32), TrainConfig(latents=64, k=4, steps=3))


def test_one_shot_iterator_is_refused_for_a_second_epoch():
    X, _ = planted(n=512)
    with pytest.raises(TrainError, match="one-shot iterator"):
        train_sae((b for b in X.split(128)), TrainConfig(latents=64, k=4, steps=10, scale_batches=1))


# --- spliced error ------------------------------------------------------------------------------------

def test_spliced_error():
    X = planted(n=512)[0]
    sae = SparseAutoencoder.init_random(32, 64, 4, scale=0.25, generator=torch.Generator().manual_seed(0))
    A = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))

    def model(x, replace=None):  # a two-layer toy "model" with the position between the layers
        h = torch.tanh(x)
        return (h if replace is None else replace(h)) @ A

    target = model(X) + 0.1
    items = list(zip(X.split(128), target.split(128)))
    ident = spliced_error(lambda it: (model(it[0]), model(it[0], lambda h: h)), items)
    assert ident == {"items": 4, "rel_change": 0.0}
    rep = splice(sae)
    res = spliced_error(lambda it: (model(it[0]), model(it[0], rep), it[1]), items)
    clean, spl = model(X), model(X, rep)
    assert res["rel_change"] == pytest.approx(float((spl - clean).pow(2).sum() / clean.pow(2).sum()), rel=1e-6)
    assert res["loss_clean"] == pytest.approx(0.01, rel=1e-4)
    assert res["loss_spliced"] > res["loss_clean"] and res["loss_increase"] > 0
    with pytest.raises(ValueError, match="no inputs"):
        spliced_error(lambda it: it, [])
