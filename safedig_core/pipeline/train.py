"""TopK SAE training for one position (docs/METHOD_NOTES.md §4), resumable bit for bit, plus quality metrics.

Reference design followed (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"):
- activations are multiplied by one scalar per position, `s = sqrt(d / E‖x‖²)` estimated on the first
  `scale_batches` batches, so the SAE works on `xs = x·s` with E‖xs‖² = d; `b_dec` starts at the mean of
  `xs` over those batches; the SAE stores `s` and speaks the model's units to its callers (sae.py);
- `z = TopK(ReLU(W_enc (xs − b_dec) + b_enc))`, `x̂s = W_decᵀ z + b_dec`; decoder rows random unit
  vectors at the start, `W_enc` = the decoder (the transpose of `W_decᵀ`), `b_enc` = 0;
- loss `FVU + auxk_coef · AuxK`. FVU is normalised by the per-token variance of `xs` measured on the
  scale batches (so every batch, whatever its size, is judged against the same baseline). AuxK: the
  `k_aux = d/2` dead latents with the largest pre-activations reconstruct the main residual, weighted
  by `min(dead / k_aux, 1)`; a latent is dead when it has not fired for `dead_tokens` tokens;
- decoder rows stay unit norm: the gradient component parallel to each row is removed before the
  Adam step and rows are renormalised after it. Adam, `lr = 2e-4 / sqrt(latents / 2**14)` unless set,
  linear decay to 0 over the last `1 - lr_decay_start` of the steps.

Data come from anything that reads like the activation store (docs/PIPELINE.md): an object with
`iter_batches(position, batch_size, prompts=None, shuffle=False, seed=0)` yielding batches with a
float `x [b, d]` (and `prompt`, `step`, `token`), a plain tensor `[N, d]` (`MemorySource`), a callable
`epoch -> iterable of batches`, or a re-iterable of batches / tensors. Epoch `e` is read with shuffle
seed `seed + e`, so a position in the data is just `(epoch, batch index)`.

Checkpoints (`<path>`, one safetensors file written to a temporary name, fsynced and renamed over the
old one, so a kill at any moment leaves the previous or the new one) hold the SAE, Adam's state, the
dead-latent counters, the metric window, the torch RNG state, the data position, the step and the
config as JSON metadata: nothing is unpickled on resume. Resuming replays the same batches in the same
order through the same arithmetic, so a run killed (SIGKILL) and resumed ends with the same weights,
bit for bit, as an uninterrupted one on the same machine, device and thread count. (On CUDA that also
needs `torch.use_deterministic_algorithms(True)` and `CUBLAS_WORKSPACE_CONFIG=:4096:8`.) Resuming skips
to the data position by reading the epoch's earlier batches again, which costs I/O but no compute.

On the CPU the backward pass touches only the selected latents (sparse_grad.py: the same gradients, summed in
another order). A `team` of several ranks (distributed.py) trains one SAE data-parallel: every member reads the
same batches, trains on its share of each, and the gradients and statistics are summed over the team before
the identical optimizer steps, so the SAE is the one-process SAE up to the order of floating-point sums. The
team's leader writes the checkpoint and the log; every member resumes from that checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..formats.atomic import remove_stale, write_text
from ..sae import SparseAutoencoder
from . import harmful as harmful_mod
from . import sparse_grad
from .checkpoint import load_optimizer, read_checkpoint, write_checkpoint
from .data import Stream, TrainError, batch_x, checked, domain_prompts, linear_decay, moments
from .decoder import decode_scaled, normalize_decoder, remove_parallel_grad
from .distributed import SINGLE, SOLO, Ranks, Team
from .metrics import sae_quality
from .progress import tqdm_progress


@dataclass
class TrainConfig:
    latents: int | None = None  # number of latents; None: expansion × d
    expansion: int = 16
    k: int = 32
    steps: int = 10_000
    batch_size: int = 4096
    lr: float | None = None  # None: 2e-4 / sqrt(latents / 2**14)
    lr_decay_start: float = 0.8  # linear decay to 0 over the steps after this fraction (1.0: none)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 6.25e-10
    auxk_coef: float = 1 / 32
    k_aux: int | None = None  # None: d // 2
    dead_tokens: int = 10_000_000  # a latent not firing for this many tokens is dead
    scale_batches: int = 8  # batches read at the start to estimate the scale, mean and variance
    shuffle: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50

    # Fields that may change between a run and its resumption without changing its arithmetic.
    RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every")

    def resolved(self, d: int) -> TrainConfig:
        """A copy with `latents`, `lr` and `k_aux` filled in for width d, after validation."""
        latents = self.latents or self.expansion * d
        c = dataclasses.replace(self, latents=latents,
                                lr=self.lr if self.lr is not None else 2e-4 / math.sqrt(latents / 2 ** 14),
                                k_aux=self.k_aux if self.k_aux is not None else max(d // 2, 1),
                                betas=tuple(self.betas))
        problems = []
        if not 0 < c.k <= latents:
            problems.append(f"k={c.k} must be in 1..{latents} (the number of latents)")
        for name in ("steps", "batch_size", "scale_batches", "checkpoint_every", "log_every", "dead_tokens", "k_aux"):
            if getattr(c, name) < 1:
                problems.append(f"{name}={getattr(c, name)} must be ≥ 1")
        if not c.lr > 0:
            problems.append(f"lr={c.lr} must be > 0")
        if not 0.0 <= c.lr_decay_start <= 1.0:
            problems.append(f"lr_decay_start={c.lr_decay_start} must be in [0, 1]")
        if c.auxk_coef < 0:
            problems.append(f"auxk_coef={c.auxk_coef} must be ≥ 0")
        if problems:
            raise TrainError("bad training config: " + "; ".join(problems))
        return c

    def lr_at(self, step: int) -> float:
        return linear_decay(self.lr, step, self.steps, self.lr_decay_start)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    metrics: dict  # the last logged window: fvu, auxk, l0, dead_frac, lr, step, tokens, plus scale
    history: list[dict] = field(default_factory=list)  # every logged window (also in the JSONL log)
    stopped: bool = False  # True when should_stop ended the run early (a checkpoint was written)
    resumed_from: int | None = None  # the step of the checkpoint the run resumed from


def _estimate(stream: Stream, n_batches: int, d: int | None):
    """Scale s, scaled mean and scaled per-token variance from the first batches of epoch 0 (float64)."""
    width, n, s1, s2 = moments(stream, n_batches, d, lambda i: f"epoch 0, batch {i}")
    if n == 0:
        raise TrainError("no activations to train on: the data source yielded no rows "
                         "(empty store, or no prompts of the requested domain at this position)")
    msq = float(s2) / n
    if msq <= 0:
        raise TrainError("all activations are zero: nothing to train on")
    scale = math.sqrt(width / msq)
    mean = s1 / n
    var = msq - float(mean.pow(2).sum())  # E‖x − μ‖² in model units
    if var <= 1e-12 * msq:
        raise TrainError("activations do not vary (every row is the same): nothing to train on")
    return width, scale, (mean * scale).float(), var * scale ** 2


def train_sae(data: Any, cfg: TrainConfig | None = None, *, position: Any = None, prompts: Any = None,
              checkpoint: str | None = None, log: str | None = None, resume: bool = True,
              device: str | torch.device | None = None,
              progress: Callable[[int, int, dict | None], None] | None = None,
              should_stop: Callable[[], bool] | None = None, team: Team = SOLO,
              sparse: bool | None = None) -> TrainResult:
    """Train a TopK SAE on the batches of `data` at `position` (see the module docstring).

    `prompts` restricts the store to those prompt indices (e.g. the source domain). With `checkpoint`
    set, a checkpoint is written every `cfg.checkpoint_every` steps, on stop and at the end; when the
    file exists and `resume` is true, the run continues from it. `log` is a JSONL file of the metric
    windows (on resume, lines after the checkpoint's step are dropped). `progress(step, total, last
    window or None)` is called after every step; `should_stop()` is polled after every step. `team`: the ranks
    training this SAE together (every member calls this with the same arguments). `sparse`: the sparse backward
    (sparse_grad.py); None picks it on the CPU, where it was faster than plain autograd at every size measured
    (docs/SCALING.md, `benchmarks/train_step.py`), and plain autograd on CUDA, where it has not been measured.
    A run and its resumption must use the same backward to end bit for bit alike.
    """
    cfg = cfg or TrainConfig()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sparse = dev.type == "cpu" if sparse is None else sparse
    if not team.leader:
        log = None
    stream = Stream(data, position, cfg.batch_size, prompts, cfg.shuffle, cfg.seed)
    d = stream.width()

    meta = tensors = None
    if checkpoint and team.leader:
        remove_stale(checkpoint)
    if checkpoint and resume and os.path.exists(checkpoint):
        meta, tensors = read_checkpoint(checkpoint)
        if d is not None and meta["d"] != d:
            raise TrainError(f"{checkpoint}: checkpoint has width {meta['d']} but the data has width {d}")
        if position is not None and meta.get("position") not in (None, str(position)):
            raise TrainError(f"{checkpoint}: checkpoint is for position {meta['position']}, not {position}")
        d = meta["d"]
        cfg = _resume_config(cfg, meta, checkpoint)
    else:
        d, scale, mean, var = _estimate(stream, cfg.scale_batches, d)
        cfg = cfg.resolved(d)
    if meta is not None:
        cfg = cfg.resolved(d)

    L = cfg.latents
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SparseAutoencoder.init_random(d, L, cfg.k, generator=gen)
    since_fired = torch.zeros(L, dtype=torch.long)
    window = torch.zeros(5, dtype=torch.float64)  # fvu, auxk, l0 sums, steps, tokens in the window
    if meta is None:
        with torch.no_grad():
            sae.scale.fill_(scale)
            sae.b_dec.copy_(mean)
        var_tok = torch.tensor(var, dtype=torch.float64)
        step, epoch, index, tokens = 0, 0, 0, 0
    else:
        sae.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        since_fired = tensors["state.since_fired"].clone()
        window = tensors["state.window"].clone()
        var_tok = tensors["state.var_tok"].clone()
        step, epoch, index, tokens = meta["step"], meta["epoch"], meta["index"], meta["tokens"]
    sae = sae.to(dev)
    since_fired, window, var_tok = since_fired.to(dev), window.to(dev), var_tok.to(dev)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if meta is not None:
        load_optimizer(opt, meta, tensors)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and dev.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    resumed_from = meta["step"] if meta is not None else None
    history = _open_log(log, step if meta is not None else None)

    def save_ckpt():
        if checkpoint and team.leader:
            state = {"since_fired": since_fired, "window": window, "var_tok": var_tok}
            write_checkpoint(checkpoint, sae, opt, params, state,
                              {"d": d, "position": str(position) if position is not None else None,
                               "config": cfg.to_json(), "step": step, "epoch": epoch, "index": index,
                               "tokens": tokens, "done": step >= cfg.steps})

    it = stream.epoch(epoch) if step < cfg.steps else iter(())
    for _ in range(index if step < cfg.steps else 0):  # skip to the data position of the checkpoint
        if next(it, None) is None:
            raise TrainError(f"the data has fewer batches than the checkpoint's position "
                             f"(epoch {epoch}, batch {index}): it changed since the checkpoint was written")
    last = history[-1] if history else None
    stopped = False
    k_aux = min(cfg.k_aux, L)
    while step < cfg.steps:
        b = next(it, None)
        if b is None:
            if index == 0:
                raise TrainError(f"no activations to train on: epoch {epoch} of the data is empty")
            epoch, index = epoch + 1, 0
            it = stream.epoch(epoch)
            continue
        x = checked(batch_x(b), d, f"epoch {epoch}, batch {index}").to(dev)
        index += 1
        if x.shape[0] == 0:
            continue
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        n = x.shape[0]
        fvu, auxk, l0, fired = _train_step(sae, x[team.share(n)] * sae.scale, var_tok, since_fired >= cfg.dead_tokens,
                                           k_aux, cfg.auxk_coef, opt, n=n, team=team, sparse=sparse)
        since_fired += n
        since_fired[fired] = 0
        tokens += n
        step += 1
        window += torch.stack([fvu, auxk, l0, torch.ones_like(fvu), torch.full_like(fvu, n)])
        if step % cfg.log_every == 0 or step == cfg.steps:
            last = _log_window(window, step, tokens, epoch, since_fired, cfg, log, history)
            window.zero_()
        if checkpoint and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_ckpt()
        if progress is not None:
            progress(step, cfg.steps, last)
        if step < cfg.steps and team.any(should_stop is not None and should_stop()):
            stopped = True
            save_ckpt()
            break
    if (last is None or last["step"] != step) and window[3] > 0:
        # stopped between two log steps: report the partial window, but keep it out of the log and the
        # history, which the checkpoint's window will complete when the run resumes
        last = _log_window(window, step, tokens, epoch, since_fired, cfg, None, [])
    team.barrier()  # the leader's last checkpoint is on disk before any member may read it again
    metrics = dict(last or {"step": step, "tokens": tokens})
    metrics["scale"] = float(sae.scale)
    return TrainResult(sae, metrics, history, stopped, resumed_from)


def _train_step(sae, xs, var_tok, dead, k_aux, auxk_coef, opt, n=None, team=SOLO, sparse=False):
    """One step on the scaled rows `xs` (this member's share of a batch of `n` rows, all of it by default):
    (fvu, auxk, l0 of the batch, the latents that fired in it)."""
    n = xs.shape[0] if n is None else n
    n_dead = int(dead.sum())
    ka = min(k_aux, n_dead) if n_dead and auxk_coef else 0
    vals, idx, a_vals, a_idx = (_codes_sparse if sparse else _codes_dense)(sae, xs, dead, ka)
    decode = (lambda v, i: sparse_grad.decode(v, i, sae.W_dec)) if sparse else \
        (lambda v, i: decode_scaled(sae, v, i, bias=False))
    e = xs - (decode(vals, idx) + sae.b_dec)
    denom = var_tok.float() * n
    fvu = e.pow(2).sum() / denom
    loss = fvu
    if ka:
        e_hat = decode(a_vals, a_idx)
        auxk = min(n_dead / k_aux, 1.0) * (e_hat - e.detach()).pow(2).sum() / denom
        loss = loss + auxk_coef * auxk
    else:
        auxk = torch.zeros((), device=xs.device)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    team.sum_grads(params)
    remove_parallel_grad(sae)
    opt.step()
    normalize_decoder(sae)
    active = vals > 0
    fired = torch.zeros(sae.latents, dtype=torch.bool, device=xs.device)
    fired[idx[active]] = True
    stats = torch.stack([fvu.detach().double(), auxk.detach().double(), active.sum().double()])
    if team.size > 1:
        both = torch.cat([stats, fired.double()])
        team.sum_([both])
        stats, fired = both[:3], both[3:] > 0
    return stats[0], stats[1], stats[2] / n, fired


def _codes_dense(sae, xs, dead, ka):
    """TopK codes (values ≥ 0, indices) and, when ka > 0, the AuxK codes of the ka largest dead latents,
    through plain autograd."""
    pre = sae.pre_acts(xs)
    vals, idx = pre.topk(sae.k, dim=-1, sorted=False)
    if not ka:
        return vals.relu(), idx, None, None
    a_vals, a_idx = pre.masked_fill(~dead, -torch.inf).topk(ka, dim=-1, sorted=False)
    return vals.relu(), idx, a_vals.relu(), a_idx


def _codes_sparse(sae, xs, dead, ka):
    """The same codes with the sparse backward: the selection on pre-activations computed without gradient,
    the AuxK choice among the dead latents' columns only."""
    with torch.no_grad():
        pre = sae.pre_acts(xs)
        idx = pre.topk(sae.k, dim=-1, sorted=False).indices
        if ka:
            dead_idx = dead.nonzero().squeeze(1)
            sel = torch.cat([idx, dead_idx[pre[:, dead_idx].topk(ka, dim=-1, sorted=False).indices]], 1)
        else:
            sel = idx
    picked = sparse_grad.picked(pre, sel, xs, sae).relu()
    k = sae.k
    return picked[:, :k], idx, (picked[:, k:] if ka else None), (sel[:, k:] if ka else None)


def _log_window(window, step, tokens, epoch, since_fired, cfg, log, history) -> dict:
    w = window.tolist()
    n = max(w[3], 1.0)
    entry = {"step": step, "tokens": tokens, "epoch": epoch, "fvu": w[0] / n, "auxk": w[1] / n,
             "l0": w[2] / n, "dead_frac": float((since_fired >= cfg.dead_tokens).double().mean()),
             "lr": cfg.lr_at(step - 1)}
    history.append(entry)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
    return entry


def _open_log(log: str | None, resume_step: int | None) -> list[dict]:
    """Fresh run: empty the log. Resume: keep the entries up to the checkpoint's step."""
    if not log:
        return []
    remove_stale(log)
    kept = []
    if resume_step is not None and os.path.exists(log):
        with open(log) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if e.get("step", math.inf) <= resume_step:
                    kept.append(e)
    write_text(log, "".join(json.dumps(e) + "\n" for e in kept))
    return kept


def _resume_config(cfg: TrainConfig, meta: dict, path: str) -> TrainConfig:
    saved = dict(meta["config"])
    saved["betas"] = tuple(saved["betas"])
    mine = cfg.to_json()
    mine["betas"] = tuple(mine["betas"])
    # fields left to None (auto) in the caller's config take the checkpoint's resolved value
    differ = [k for k, v in mine.items()
              if k not in TrainConfig.RESUMABLE_CHANGES and v is not None and v != saved.get(k)]
    if differ:
        pairs = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in differ)
        raise TrainError(f"{path}: the checkpoint was written with a different training config ({pairs}); "
                         "resume with the same settings or start afresh (delete the checkpoint)")
    return dataclasses.replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in TrainConfig.RESUMABLE_CHANGES})


def train_store(store: Any, out_dir: str, positions: list | None = None, cfg: TrainConfig | None = None,
                harmful_cfg: Any = None, *, dictionary_path: str | None = None, resume: bool = True,
                device: Any = None, eval_batches: int | None = 32, progress: bool = True,
                should_stop: Callable[[], bool] | None = None, provenance: dict | None = None,
                auto_dead_tokens: bool = False, ranks: Ranks = SINGLE) -> dict:
    """Train one SAE per position of an activation store on its source-domain rows, score harmful
    latents, and write the (partial, after every position) dictionary file. Checkpoints and logs go to
    `out_dir/<position>.ckpt.safetensors` / `.log.jsonl`. Returns {position name: metrics}.
    Raises KeyboardInterrupt when `should_stop` stopped a run (its checkpoint and the dictionary of the
    finished positions are written first). `auto_dead_tokens` caps `cfg.dead_tokens` at half the
    position's rows, so that small stores still see AuxK at work. With several `ranks` (torchrun) each position
    is trained by its team (`Ranks.assign`: one rank, or several data-parallel when there are more ranks than
    positions), whose leader leaves the entry in `out_dir/<position>.entry.safetensors`, and rank 0 writes the
    dictionary of all of them, the same file one process writes."""
    from ..formats.dictionary import DictionaryEntry, SafetyDictionary, load, save

    cfg = cfg or TrainConfig()
    positions = list(positions if positions is not None else store.positions)
    if not positions:
        raise TrainError("no positions to train")
    src = domain_prompts(store, "source")
    if not src:
        raise TrainError("the store has no source-domain prompts: the dictionary is trained on the source domain")
    dictionary_path = dictionary_path or os.path.join(out_dir, "dictionary.safetensors")
    os.makedirs(out_dir, exist_ok=True)
    entries, report = {}, {}
    teams = ranks.teams(len(positions))
    for j, p in enumerate(positions):
        team = teams.get(j)
        if team is None:
            continue
        base = os.path.join(out_dir, str(p))
        pcfg = cfg
        if auto_dead_tokens and hasattr(store, "rows"):
            pcfg = dataclasses.replace(cfg, dead_tokens=max(1, min(cfg.dead_tokens, store.rows(p) // 2)))
        cb = tqdm_progress(str(p), cfg.steps) if progress and team.leader else None
        try:
            res = train_sae(store, pcfg, position=p, prompts=src, checkpoint=base + ".ckpt.safetensors",
                            log=base + ".log.jsonl", resume=resume, device=device, progress=cb,
                            should_stop=should_stop, team=team)
        finally:
            if cb is not None:
                cb.close()
        if res.stopped:
            if entries and ranks.world == 1:
                save(SafetyDictionary(store.family, entries, {}, dict(provenance or {}, partial=True)), dictionary_path)
            raise KeyboardInterrupt
        if not team.leader:
            continue
        sae = res.sae
        ev = sae_quality(sae, store, position=p, prompts=src, batch_size=cfg.batch_size, max_batches=eval_batches)
        hs = harmful_mod.find_harmful(sae, store, store.prompts, harmful_cfg, position=p, domain="source",
                                      batch_size=cfg.batch_size)
        metrics = {"fvu": ev["fvu"], "l0": ev["l0"], "dead_frac": res.metrics.get("dead_frac", ev["dead_frac"]),
                   "never_fired_frac": ev["dead_frac"], "train_steps": res.metrics.get("step", cfg.steps),
                   "train_tokens": res.metrics.get("tokens", 0), **hs.metadata()}
        entries[p] = DictionaryEntry(p, sae.cpu().requires_grad_(False), hs.indices, hs.scores, hs.safe_values, metrics)
        report[str(p)] = dict(metrics, harmful=len(hs.indices), resumed_from=res.resumed_from)
        if ranks.world > 1:
            save(SafetyDictionary(store.family, {p: entries[p]}, {}, {}), base + ".entry.safetensors")
        else:
            partial = len(entries) < len(positions)
            save(SafetyDictionary(store.family, entries, {}, dict(provenance or {}, partial=partial)), dictionary_path)
    if ranks.world > 1:
        ranks.barrier()
        for j, p in enumerate(positions):
            if j not in teams or not teams[j].leader:
                e = load(os.path.join(out_dir, f"{p}.entry.safetensors")).entries[p]
                entries[p] = e
                report[str(p)] = dict(e.metrics, harmful=len(e.harmful))
        entries = {p: entries[p] for p in positions}
        report = {str(p): report[str(p)] for p in positions}
        if ranks.main:
            save(SafetyDictionary(store.family, entries, {}, dict(provenance or {}, partial=False)), dictionary_path)
        ranks.barrier()
    return report


