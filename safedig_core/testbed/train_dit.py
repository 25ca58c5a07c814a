"""Train the testbed DiT: `python -m safedig_core.testbed.train_dit [--seed 0] [--steps N] [--minutes M]`.

Rectified flow on the world's renders (`world.dit_captions()`: every phrasing, implicit ones included, and
the two-object scenes, a `--pairs` share of each batch), the network predicting the clean image x0 (loss: MSE on x0; t ~ logit-normal(0, 1); the noisy
input is x_t = (1 - t) x0 + t noise, and the network's timestep input is t = sigma, as in ComfyUI's FLUX).
Classifier-free guidance dropout: 10% of captions replaced by the empty prompt. AdamW, warm-up then cosine
decay, EMA of the weights (the EMA weights are what is saved).

Deterministic: batch k is a pure function of (--seed, k) (captions, renders, noise, times), so a run killed
and resumed from its checkpoint continues exactly where it was. Checkpoints are written atomically
(tmp + rename) to --work every --ckpt-every steps and at the end; a rerun with the same --work resumes.
The training stops at --steps or when --minutes of training time (summed over resumes) are spent, and
writes the EMA weights (fp16) to --out and the log (one JSON line per --log-every steps) next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

from ..formats.atomic import replacing, write_text
from . import ASSETS
from . import world as W
from .model import ARCH, build_model, sample_x0, save_dit, to_image
from .text import REPO, TextEncoder

DEFAULT_WORK = os.path.join(REPO, ".cache", "safedig_testbed", "train")


@contextlib.contextmanager
def out_of_place_adds():
    """ComfyUI's FLUX blocks add residuals in place (`img += ...`) to save memory at inference, which breaks
    autograd (the pre-norm saved that tensor). Inside this context `t += u` on tensors rebinds to `t + u`:
    the same forward code and the same numbers, trainable. Used only by training (never at inference)."""
    old = torch.Tensor.__iadd__
    torch.Tensor.__iadd__ = lambda self, other: self + other
    try:
        yield
    finally:
        torch.Tensor.__iadd__ = old


def pytorch_attention_options() -> dict:
    """transformer_options making ComfyUI's attention use torch's SDPA (its CPU default is sub-quadratic
    attention; same maths, SDPA trains faster)."""
    import comfy.ldm.modules.attention as A

    return {"optimized_attention_override": lambda func, *args, **kwargs: A.attention_pytorch(*args, **kwargs)}


class Data:
    """Captions (with their cached encodings) and a deterministic batch sampler."""

    def __init__(self, encoder: TextEncoder | None = None):
        self.caps = W.dit_captions()
        enc = encoder or TextEncoder()
        texts = [c.text for c in self.caps] + [""]
        ctx, pooled = enc.encode_cached(texts)
        self.ctx, self.pooled = ctx[:-1], pooled[:-1]
        self.empty_ctx, self.empty_pooled = ctx[-1:], pooled[-1:]
        self.by_concept = {n: np.array([i for i, c in enumerate(self.caps) if c.concept == n and not c.partner])
                           for n in W.NAMES}
        self.pairs = np.array([i for i, c in enumerate(self.caps) if c.partner])

    def batch(self, seed: int, step: int, size: int, p_uncond: float = 0.1, p_pair: float = 0.0):
        """Batch `step`: each item a single-object caption (uniform over concepts) or, with probability
        `p_pair`, a two-object one (uniform over them)."""
        rng = np.random.default_rng([seed, step, 17])
        concepts = rng.integers(len(W.NAMES), size=size)
        idx = np.array([rng.choice(self.by_concept[W.NAMES[c]]) for c in concepts])
        if p_pair > 0:
            pair = rng.random(size) < p_pair
            idx = np.where(pair, rng.choice(self.pairs, size=size), idx)
        img_seeds = rng.integers(0, 2**62, size=size)
        caps = [self.caps[i] for i in idx]
        imgs = W.render_batch([c.concept for c in caps], [c.background for c in caps], img_seeds,
                              [c.partner for c in caps])
        x0 = torch.from_numpy(imgs) * 2.0 - 1.0
        drop = torch.from_numpy(rng.random(size) < p_uncond)
        ctx = torch.where(drop[:, None, None], self.empty_ctx, self.ctx[idx])
        pooled = torch.where(drop[:, None], self.empty_pooled, self.pooled[idx])
        g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(size, generator=g))
        return x0, ctx, pooled, noise, t


def lr_at(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def _save_ckpt(path, state):
    with replacing(path) as tmp:
        torch.save(state, tmp)


def _preview(net, data: Data, path: str, steps: int = 20, cfg: float = 3.0):
    """Two samples per concept and a row of two-object scenes (training-time sampler) as a PNG grid, for
    watching a run."""
    from PIL import Image

    caps = [next(c for c in data.caps if c.concept == n and c.phrasing == "explicit") for n in W.NAMES]
    caps += [next((c for c in data.caps if c.concept == n and c.phrasing == "implicit"), caps[i])
             for i, n in enumerate(W.NAMES)]
    pairs = [data.caps[i] for i in data.pairs]
    caps += [pairs[(k * 97) % len(pairs)] for k in range(len(W.NAMES))]
    idx = [data.caps.index(c) for c in caps]
    noise = torch.randn(len(idx), 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    net.eval()
    x = sample_x0(net, data.ctx[idx], data.pooled[idx], data.empty_ctx, data.empty_pooled, noise, steps, cfg)
    img = to_image(x).numpy()
    n = len(W.NAMES)
    grid = np.concatenate([np.concatenate(list(img[r * n:(r + 1) * n]), axis=2) for r in range(3)], axis=1)
    Image.fromarray((grid.transpose(1, 2, 0) * 255).round().astype(np.uint8)).resize(
        (grid.shape[2] * 3, grid.shape[1] * 3), Image.NEAREST).save(path)


def train(seed: int = 0, steps: int = 4000, minutes: float = 60.0, batch: int = 32, lr: float = 1e-3,
          warmup: int = 200, ema_decay: float = 0.999, work: str = DEFAULT_WORK,
          out: str = os.path.join(ASSETS, "dit.safetensors"), threads: int = 2, ckpt_every: int = 100,
          log_every: int = 25, preview_every: int = 500, arch: dict | None = None, fresh: bool = False,
          pairs: float = 0.3) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    arch = dict(arch or ARCH)
    os.makedirs(work, exist_ok=True)
    ckpt_path = os.path.join(work, "ckpt.pt")
    log_path = os.path.join(work, "train_log.jsonl")
    if fresh:
        for p in (ckpt_path, log_path):
            if os.path.exists(p):
                os.remove(p)

    model = build_model(arch, seed=seed)
    net = model.diffusion_model
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, spent, pending = 0, 0.0, None
    config = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup, "ema_decay": ema_decay,
              "arch": arch, "objective": "x0", "t_sampling": "logit-normal(0,1)", "cfg_dropout": 0.1,
              "pairs": pairs}
    if os.path.isfile(ckpt_path):
        st = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # tensors and plain data only: no code
        if st["config"] != config:
            raise SystemExit(f"{ckpt_path} is from a run with another configuration: {st['config']} "
                             f"(use --fresh or another --work)")
        net.load_state_dict(st["net"])
        ema = st["ema"]
        opt.load_state_dict(st["opt"])
        step, spent = st["step"], st["spent"]
        pending = st.get("pending")
        print(f"[train_dit] resumed at step {step} ({spent / 60:.1f} min spent)", flush=True)
    # the log holds exactly the lines up to the checkpoint
    lines = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(log_path, "w") as f:
        f.writelines(lines)

    data = Data()
    to = pytorch_attention_options()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"[train_dit] {n_params / 1e6:.2f} M parameters, batch {batch}, {steps} steps, budget {minutes} min, "
          f"{threads} threads", flush=True)
    net.train()
    losses, t_last = [], time.time()
    bins = np.zeros(4)
    counts = np.zeros(4)
    if pending:  # the log interval a resumed run was in the middle of
        losses, bins, counts = list(pending["losses"]), np.array(pending["bins"]), np.array(pending["counts"])
    while step < steps and spent < minutes * 60:
        t0 = time.time()
        x0, ctx, pooled, noise, t = data.batch(seed, step, batch, p_pair=pairs)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        with out_of_place_adds():
            pred = net(xt, t, ctx, y=pooled, transformer_options=dict(to))
        per = (pred.float() - x0).pow(2).mean(dim=(1, 2, 3))
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in net.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        b = np.minimum((t.numpy() * 4).astype(int), 3)
        np.add.at(bins, b, per.detach().numpy())
        np.add.at(counts, b, 1)
        losses.append(loss.item())
        step += 1
        spent += time.time() - t0
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                   "minutes": round(spent / 60, 3), "samples_per_s": round(len(losses) * batch / max(1e-9, time.time() - t_last), 1),
                   "loss_by_t": [round(float(a / max(c, 1)), 5) for a, c in zip(bins, counts)]}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"[train_dit] step {step}/{steps} loss {rec['loss']:.4f} (t bins {rec['loss_by_t']}) "
                  f"lr {rec['lr']:.2e} {rec['samples_per_s']} img/s {spent / 60:.1f} min", flush=True)
            losses, t_last = [], time.time()
            bins[:], counts[:] = 0, 0
        if step % ckpt_every == 0 or step == steps:
            _save_ckpt(ckpt_path, {"net": net.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                                   "spent": spent, "config": config,
                                   "pending": {"losses": losses, "bins": bins.tolist(), "counts": counts.tolist()}})
        if preview_every and step % preview_every == 0:
            _preview(_ema_net(model, ema), data, os.path.join(work, f"preview_{step:06d}.png"))
            net.train()

    _save_ckpt(ckpt_path, {"net": net.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step,
                           "spent": spent, "config": config,
                           "pending": {"losses": losses, "bins": bins.tolist(), "counts": counts.tolist()}})
    final = _ema_net(model, ema)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_dit(final, out, arch, extra={"train": {**config, "steps_done": step, "minutes": round(spent / 60, 2)}})
    log_out = os.path.join(os.path.dirname(os.path.abspath(out)), "dit_train_log.jsonl")
    with open(log_path) as f:
        recs = [json.loads(ln) for ln in f if ln.strip()]
    write_text(log_out, "".join(json.dumps(r) + "\n" for r in [{"config": config, "parameters": n_params}] + recs))
    _preview(final, data, os.path.join(work, "preview_final.png"))
    summary = {"steps": step, "minutes": round(spent / 60, 2), "final_loss": recs[-1]["loss"] if recs else None,
               "out": out, "bytes": os.path.getsize(out)}
    print(f"[train_dit] done: {json.dumps(summary)}", flush=True)
    return summary


def _ema_net(model, ema):
    """A copy of the network carrying the EMA weights."""
    import copy

    net = copy.deepcopy(model.diffusion_model)
    net.load_state_dict(ema)
    net.eval()
    return net


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m safedig_core.testbed.train_dit", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=60.0, help="training-time budget, summed over resumes")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=DEFAULT_WORK, help="checkpoint folder (a rerun resumes from it)")
    ap.add_argument("--out", default=os.path.join(ASSETS, "dit.safetensors"))
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --work")
    ap.add_argument("--preview-every", type=int, default=500)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=ARCH["hidden_size"])
    ap.add_argument("--pairs", type=float, default=0.3, help="share of two-object scenes in each batch")
    a = ap.parse_args(argv)
    from ..adapters.comfy import runtime as comfyui

    comfyui.bootstrap()
    arch = dict(ARCH, hidden_size=a.hidden)
    train(seed=a.seed, steps=a.steps, minutes=a.minutes, batch=a.batch, lr=a.lr, threads=a.threads, work=a.work,
          out=a.out, fresh=a.fresh, preview_every=a.preview_every, ckpt_every=a.ckpt_every, arch=arch,
          pairs=a.pairs)


if __name__ == "__main__":
    sys.exit(main())
