"""The sparse TopK backward (safedig_core.pipeline.sparse_grad) gives the dense autograd gradients: for the
pieces (hypothesis over shapes, with and without AuxK latents), for one training step, and for a short run."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from safedig_core.pipeline import sparse_grad
from safedig_core.pipeline import train as train_mod
from safedig_core.pipeline.train import TrainConfig, train_sae
from safedig_core.sae import SparseAutoencoder

ATOL = 1e-5  # float32 sums taken in another order; the gradients below are O(1)


def _sae(d, latents, k, seed):
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder.init_random(d, latents, k, generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
    return sae


def _grads(sae, loss):
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in params]


def _loss(sae, xs, dead, ka, sparse):
    """TopK reconstruction plus an AuxK-like term on the ka largest dead latents, as training has them."""
    if sparse:
        with torch.no_grad():
            pre = sae.pre_acts(xs)
            idx = pre.topk(sae.k, dim=-1, sorted=False).indices
            a_idx = pre.masked_fill(~dead, -torch.inf).topk(ka, dim=-1, sorted=False).indices
        sel = torch.cat([idx, a_idx], 1)
        z = sparse_grad.picked(pre, sel, xs, sae).relu()
        rec = sparse_grad.decode(z[:, :sae.k], idx, sae.W_dec) + sae.b_dec
        aux = sparse_grad.decode(z[:, sae.k:], a_idx, sae.W_dec)
    else:
        pre = sae.pre_acts(xs)
        v, idx = pre.topk(sae.k, dim=-1, sorted=False)
        av, a_idx = pre.masked_fill(~dead, -torch.inf).topk(ka, dim=-1, sorted=False)
        rec = F.embedding_bag(idx, sae.W_dec, per_sample_weights=v.relu(), mode="sum") + sae.b_dec
        aux = F.embedding_bag(a_idx, sae.W_dec, per_sample_weights=av.relu(), mode="sum")
    e = xs - rec
    return e.pow(2).sum() / len(xs) + 0.3 * (aux - e.detach()).pow(2).sum() / len(xs)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), d=st.integers(1, 12), latents=st.integers(2, 48), k=st.integers(1, 8),
       ka=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_gradients_equal_dense_autograd(rows, d, latents, k, ka, seed):
    k = min(k, latents - 1)
    g = torch.Generator().manual_seed(seed + 1)
    dead = torch.zeros(latents, dtype=torch.bool)
    dead[torch.randperm(latents, generator=g)[:max(ka, latents // 2)]] = True
    ka = min(ka, int(dead.sum()))
    xs = torch.randn(rows, d, generator=g)
    sae = _sae(d, latents, k, seed)
    dense = _grads(sae, _loss(sae, xs, dead, ka, sparse=False))
    sparse = _grads(sae, _loss(sae, xs, dead, ka, sparse=True))
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), dense, sparse):
        assert torch.allclose(a, b, atol=ATOL, rtol=1e-5), (name, float((a - b).abs().max()))


def test_input_gradient_and_empty_batch():
    sae = _sae(6, 20, 3, 0)
    xs = torch.randn(9, 6, requires_grad=True)
    with torch.no_grad():
        pre = sae.pre_acts(xs)
    sel = pre.topk(3, dim=-1).indices
    (sparse_grad.picked(pre, sel, xs, sae) ** 2).sum().backward()
    g_sparse = xs.grad.clone()
    xs.grad = None
    (sae.pre_acts(xs).gather(1, sel) ** 2).sum().backward()
    assert torch.allclose(g_sparse, xs.grad, atol=ATOL)
    # a data-parallel member may get no rows of a small batch: zero gradients, not an error
    empty = torch.zeros(0, 6)
    sae.zero_grad(set_to_none=True)
    z = sparse_grad.picked(sae.pre_acts(empty).detach(), torch.zeros(0, 3, dtype=torch.long), empty, sae)
    sparse_grad.decode(z, torch.zeros(0, 3, dtype=torch.long), sae.W_dec).sum().backward()
    assert float(sae.W_dec.grad.abs().sum()) == 0 and float(sae.W_enc.grad.abs().sum()) == 0


@pytest.mark.parametrize("with_dead", [False, True])
def test_training_step_equals_the_dense_step(with_dead):
    """One optimizer step of the trainer: the same statistics and, within float tolerance, the same SAE."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(200, 16, generator=g) * 2
    dead = torch.rand(96, generator=g) < (0.6 if with_dead else 0.0)
    out = []
    for sparse in (False, True):
        sae = _sae(16, 96, 4, 5)
        opt = torch.optim.Adam([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], lr=1e-3)
        stats = train_mod._train_step(sae, xs, torch.tensor(3.0, dtype=torch.float64), dead, 8, 1 / 32, opt,
                                      sparse=sparse)
        out.append((sae.state_dict(), stats))
    (a, sa), (b, sb) = out
    for name in a:
        assert torch.allclose(a[name], b[name], atol=ATOL), name
    assert float(sa[0]) == pytest.approx(float(sb[0]), rel=1e-6) and float(sa[1]) == pytest.approx(float(sb[1]), rel=1e-6)
    assert float(sa[2]) == float(sb[2]) and torch.equal(sa[3], sb[3])
    assert (float(sa[1]) > 0) == with_dead


def test_training_run_equals_the_dense_run():
    """40 steps with AuxK at work: the sparse backward (the CPU default) trains the dense backward's SAE."""
    g = torch.Generator().manual_seed(11)
    D = F.normalize(torch.randn(16, 24, generator=g), dim=1)
    idx = torch.rand(3000, 16, generator=g).argsort(1)[:, :2]
    X = torch.zeros(3000, 16).scatter_(1, idx, torch.rand(3000, 2, generator=g) + 0.5) @ D
    cfg = TrainConfig(latents=128, k=2, steps=40, batch_size=128, dead_tokens=512, log_every=10)
    dense, sparse = train_sae(X, cfg, sparse=False), train_sae(X, cfg)
    assert any(h["auxk"] > 0 for h in sparse.history), "AuxK should be at work"
    for name, t in dense.sae.state_dict().items():
        assert torch.allclose(t, sparse.sae.state_dict()[name], atol=ATOL), name
    for h0, h1 in zip(dense.history, sparse.history):
        assert h0["fvu"] == pytest.approx(h1["fvu"], rel=1e-4) and h0["l0"] == h1["l0"]
