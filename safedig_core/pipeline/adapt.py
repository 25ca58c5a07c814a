"""Encoder-frozen decoder adaptation (docs/METHOD_NOTES.md §5): refit an SAE's decoder on target-domain activations.

The encoder (`W_enc`, `b_enc`) is the reusable safety dictionary and is never touched (bit for bit),
so the harmful latents keep their meaning. Only `W_dec` and `b_dec` are trained, on

    L = FVU_target + λ ‖W_dec − W_dec_src‖² + μ FVU_source_replay

with each FVU normalised by the per-token variance of its domain (estimated on the first batches, as
in training), decoder rows kept at unit norm (parallel gradient removed, rows renormalised after each
Adam step), so `‖w − w_src‖² = 2 (1 − cos)` per row. In this SAE form `b_dec` also centres the
encoder's input (`z = TopK(W_enc (xs − b_dec) + b_enc)`), so moving it shifts every pre-activation by
`−W_enc Δb_dec`; the codes are computed with the current `b_dec` during adaptation (what inference
will do), the gradient flows through both uses, and the shift is reported (`b_dec_shift`, in scaled
units; `train_bias=False` keeps `b_dec` fixed and the encoder function exactly as it was).

μ starts at `replay`; with `retention` set (default 0.05) it is raised by dual ascent on log μ whenever
the replayed source FVU (a running mean over batches) exceeds its pre-adaptation value by more than 80 %
of the `retention` budget, and falls back (never below `replay`) when it does not: the 5 % source
retention is held as a constraint rather than left to the choice of μ. λ (`anchor`) is a weak pull on
rows that the data do not constrain.

Reported: target and source FVU before and after (source retention = after / before), and the cosine
drift `1 − cos(w_j, w_j_src)` of the harmful decoder rows (mean, max) and of all rows (mean).

A `team` of several ranks (distributed.py) adapts one decoder data-parallel, as training does: each member
takes its share of every target and source batch, the FVU terms are normalised by the whole batch, the anchor
term is counted once (by the leader), and gradients and the FVU values that drive μ are summed over the team,
so every member takes the same steps; only the leader measures the before/after metrics.
"""
from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..sae import SparseAutoencoder
from . import harmful as harmful_mod
from .data import Stream, TrainError, batch_x, checked, domain_prompts, linear_decay, moments
from .decoder import decode_scaled, normalize_decoder, remove_parallel_grad
from .distributed import SINGLE, SOLO, Ranks, Team
from .metrics import sae_quality
from .progress import tqdm_progress


class AdaptError(TrainError):
    """Bad adaptation input (no target rows, an SAE that is not TopK, NaN activations, ...)."""


@dataclass
class AdaptConfig:
    steps: int = 1000
    batch_size: int = 4096
    lr: float = 1e-3
    lr_decay_start: float = 0.8  # linear decay to 0 after this fraction of the steps
    anchor: float = 1e-3  # λ: weight of ‖W_dec − W_dec_src‖² (sum over all entries)
    replay: float = 1.0  # μ: weight of the source-replay FVU (ignored without source data)
    retention: float | None = 0.05  # keep the replayed source FVU within (1 + this) × its value before
    # adaptation: μ is raised by dual ascent while the constraint is violated (None: μ stays fixed)
    dual_lr: float = 0.5  # step of the dual ascent on log μ, per step, per unit of relative violation
    max_replay: float = 1e4  # ceiling of μ: past it the source term already dominates the loss
    train_bias: bool = True
    var_batches: int = 8  # batches read at the start to estimate each domain's variance
    shuffle: bool = True
    seed: int = 0
    eval_batches: int | None = None  # batches per domain for the before/after FVU (None: all)
    log_every: int = 50

    def check(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "var_batches", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 1")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.anchor < 0 or self.replay < 0:
            problems.append(f"anchor={self.anchor} and replay={self.replay} must be ≥ 0")
        if self.retention is not None and not self.retention > 0:
            problems.append(f"retention={self.retention} must be > 0 (or None)")
        if self.retention is not None and not self.replay > 0:
            problems.append("retention needs replay > 0 (μ is scaled from it)")
        if not 0.0 <= self.lr_decay_start <= 1.0:
            problems.append(f"lr_decay_start={self.lr_decay_start} must be in [0, 1]")
        if problems:
            raise AdaptError("bad adaptation config: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        return linear_decay(self.lr, step, self.steps, self.lr_decay_start)


@dataclass
class AdaptResult:
    sae: SparseAutoencoder  # a new SAE: the input one is left as it was
    metrics: dict
    history: list[dict] = field(default_factory=list)
    stopped: bool = False


class _Cycle:
    """Endless batches of a stream, epoch after epoch (shuffle seed + epoch)."""

    def __init__(self, stream: Stream, d: int, name: str):
        self.stream, self.d, self.name, self.epoch, self.index = stream, d, name, 0, 0
        self.it = stream.epoch(0)

    def next(self) -> torch.Tensor:
        while True:
            b = next(self.it, None)
            if b is None:
                if self.index == 0:
                    raise AdaptError(f"no {self.name} activations: epoch {self.epoch} of the {self.name} data is empty")
                self.epoch, self.index = self.epoch + 1, 0
                self.it = self.stream.epoch(self.epoch)
                continue
            x = checked(batch_x(b), self.d, f"{self.name} data, epoch {self.epoch}, batch {self.index}")
            self.index += 1
            if len(x):
                return x


def _variance(stream: Stream, d: int, n_batches: int, scale: float, name: str) -> float:
    """Per-token variance E‖xs − μ‖² of the scaled activations, from the first batches of epoch 0."""
    _, n, s1, s2 = moments(stream, n_batches, d, lambda i: f"{name} data, batch {i}", scale)
    if n == 0:
        raise AdaptError(f"no {name} activations to adapt on (empty store, or no {name}-domain prompts at this position)")
    s2 = float(s2)
    var = s2 / n - float((s1 / n).pow(2).sum())
    if var <= 1e-12 * max(s2 / n, 1e-30):
        raise AdaptError(f"{name} activations do not vary: nothing to adapt to")
    return var


def _drift(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    cos = torch.nn.functional.cosine_similarity(w.double(), w0.double(), dim=1)
    return 1.0 - cos


def adapt_decoder(sae: SparseAutoencoder, target: Any, source: Any = None, cfg: AdaptConfig | None = None, *,
                  harmful: list[int] | None = None, position: Any = None, target_prompts: Any = None,
                  source_prompts: Any = None, device: Any = None, log: str | None = None,
                  progress: Callable[[int, int, dict | None], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, team: Team = SOLO) -> AdaptResult:
    """Fit a copy of `sae`'s decoder to `target` data, replaying `source` data (both read like the
    activation store; `*_prompts` restrict them to prompt indices, e.g. the target / source domain).
    `harmful` latents get their decoder drift reported. Returns the adapted copy and the metrics (on a
    `team`'s other members, only the number of steps)."""
    cfg = cfg or AdaptConfig()
    cfg.check()
    if sae.activation != "topk":
        raise AdaptError(f"decoder adaptation needs a TopK SAE, this one uses {sae.activation}")
    if sae.normalize != "none":
        raise AdaptError(f"decoder adaptation works on SAEs without per-token input normalisation; this one "
                         f"uses {sae.normalize} (converted from another library)")
    dev = torch.device(device) if device is not None else sae.W_dec.device
    src_sae = sae
    sae = copy.deepcopy(sae).float().to(dev)
    d, scale = sae.d, float(sae.scale)
    t_stream = Stream(target, position, cfg.batch_size, target_prompts, cfg.shuffle, cfg.seed)
    s_stream = Stream(source, position, cfg.batch_size, source_prompts, cfg.shuffle, cfg.seed) if source is not None else None
    var_t = _variance(t_stream, d, cfg.var_batches, scale, "target")
    var_s = _variance(s_stream, d, cfg.var_batches, scale, "source") if s_stream else None
    ev = {"position": position, "batch_size": cfg.batch_size, "max_batches": cfg.eval_batches}
    if team.leader:
        before_t = sae_quality(sae, target, prompts=target_prompts, **ev)
        before_s = sae_quality(sae, source, prompts=source_prompts, **ev) if source is not None else None

    for p in (sae.W_enc, sae.b_enc):
        p.requires_grad_(False)
    trained = [sae.W_dec] + ([sae.b_dec] if cfg.train_bias else [])
    if not cfg.train_bias:
        sae.b_dec.requires_grad_(False)
    w_src = sae.W_dec.detach().clone()
    b_src = sae.b_dec.detach().clone()
    opt = torch.optim.Adam(trained, lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
    t_cycle = _Cycle(t_stream, d, "target")
    s_cycle = _Cycle(s_stream, d, "source") if s_stream else None
    base_s = _baseline(sae, s_stream, d, cfg.var_batches, var_s) if s_cycle is not None else None
    log_mu, ema = 0.0, None  # μ = replay · exp(log_mu), raised while the retention constraint is violated
    history, window, stopped, step = [], torch.zeros(5, dtype=torch.float64), False, 0
    logf = open(log, "w") if log and team.leader else None  # noqa: SIM115 -- closed in the finally below
    try:
        while step < cfg.steps:
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step)
            fvu_t = _fvu(sae, t_cycle.next().to(dev), var_t, team)
            anchor = (sae.W_dec - w_src).pow(2).sum()
            loss = fvu_t + cfg.anchor * anchor if team.leader else fvu_t
            fvu_s = torch.zeros((), device=dev)
            mu = cfg.replay * math.exp(log_mu)
            if s_cycle is not None and cfg.replay:
                fvu_s = _fvu(sae, s_cycle.next().to(dev), var_s, team)
                loss = loss + mu * fvu_s
            if team.size > 1:  # the whole batch's values, on every member
                total = torch.stack([loss.detach(), fvu_t.detach(), fvu_s.detach()])
                team.sum_([total])
                loss_value, fvu_t, fvu_s = total.unbind()
            else:
                loss_value = loss
            if not torch.isfinite(loss_value):
                raise AdaptError(f"adaptation diverged at step {step} (loss {float(loss_value)}): lower --lr or --replay")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            team.sum_grads(trained)
            remove_parallel_grad(sae)
            opt.step()
            normalize_decoder(sae)
            step += 1
            if cfg.retention is not None and s_cycle is not None:
                r = float(fvu_s.detach()) / base_s
                ema = r if ema is None else 0.9 * ema + 0.1 * r
                # aim at 80 % of the budget: the batch estimates are noisy, the promise is on the whole set
                log_mu = max(0.0, log_mu + cfg.dual_lr * (ema - 1.0 - 0.8 * cfg.retention) / cfg.retention)
                log_mu = min(log_mu, math.log(cfg.max_replay / cfg.replay))  # an unmeetable bound must not overflow μ
            window += torch.tensor([float(fvu_t.detach()), float(fvu_s.detach()), float(anchor.detach()), mu, 1.0],
                                   dtype=torch.float64)
            last = history[-1] if history else None
            if step % cfg.log_every == 0 or step == cfg.steps:
                w = (window / window[4]).tolist()
                last = {"step": step, "fvu_target": w[0], "fvu_source": w[1], "anchor": w[2], "replay": w[3],
                        "lr": cfg.lr_at(step - 1)}
                history.append(last)
                window.zero_()
                if logf:
                    logf.write(json.dumps(last) + "\n")
                    logf.flush()
            if progress is not None:
                progress(step, cfg.steps, last)
            if step < cfg.steps and team.any(should_stop is not None and should_stop()):
                stopped = True
                break
    finally:
        if logf:
            logf.close()

    for name, p in sae.named_parameters():  # the copy's grad flags as the input's
        p.requires_grad_(getattr(src_sae, name).requires_grad)
    if not team.leader:
        return AdaptResult(sae, {"adapt_steps": step}, history, stopped)
    after_t = sae_quality(sae, target, prompts=target_prompts, **ev)
    after_s = sae_quality(sae, source, prompts=source_prompts, **ev) if source is not None else None
    drift = _drift(sae.W_dec.detach(), w_src)
    m = {"adapt_steps": step, "target_fvu_before": before_t["fvu"], "target_fvu_after": after_t["fvu"],
         "decoder_drift_mean": float(drift.mean()), "b_dec_shift": float((sae.b_dec.detach() - b_src).norm())}
    if before_s is not None:
        m["replay_weight_final"] = cfg.replay * math.exp(log_mu)
        m.update(source_fvu_before=before_s["fvu"], source_fvu_after=after_s["fvu"],
                 source_retention=after_s["fvu"] / max(before_s["fvu"], 1e-30))
    if harmful:
        h = drift[torch.as_tensor(harmful, dtype=torch.long, device=drift.device)]
        m.update(harmful_drift_mean=float(h.mean()), harmful_drift_max=float(h.max()))
    return AdaptResult(sae, m, history, stopped)


@torch.no_grad()
def _baseline(sae: SparseAutoencoder, stream: Stream, d: int, n_batches: int, var: float) -> float:
    """Mean replay FVU of the unadapted SAE on the first batches (the retention constraint's reference)."""
    vals = []
    for i, b in enumerate(stream.epoch(0)):
        if i >= n_batches:
            break
        x = checked(batch_x(b), d, f"source data, batch {i}")
        if len(x):
            vals.append(float(_fvu(sae, x.to(sae.W_dec.device), var)))
    return max(sum(vals) / max(len(vals), 1), 1e-12)


def _fvu(sae: SparseAutoencoder, x: torch.Tensor, var: float, team: Team = SOLO) -> torch.Tensor:
    """FVU of a batch of unscaled rows x: this member's share of the sum, over the whole batch's variance."""
    xs = x[team.share(x.shape[0])] * sae.scale
    vals, idx = sae.encode_sparse(xs)  # frozen W_enc, b_enc; the current b_dec centres the input
    e = xs - decode_scaled(sae, vals, idx)
    return e.pow(2).sum() / (var * x.shape[0])


RESCORE_MODES = ("rescore", "union", "reselect", "guarded")


def rescore_harmful(sae: SparseAutoencoder, data: Any, prompts: list | None, harmful: list[int],
                    mode: str = "rescore", cfg: harmful_mod.HarmfulConfig | None = None,
                    **kw) -> harmful_mod.HarmfulScores:
    """Score the latents on the target domain through the (frozen) encoder.

    - `rescore`: keep the harmful set, replace its scores and safe values by the target-domain ones;
    - `union`: the harmful set plus latents newly selected on the target domain;
    - `guarded`: the union, admitting the new latents one at a time (in selection order) only where the per-image
      gate's separation does not fall: the AUROC of the image peaks (`harmful.harmful_peaks`) of every unsafe
      prompt of `data` against its safe source prompts (needs a store and `position`);
    - `reselect`: the target-domain selection alone.
    Keyword arguments go to `harmful.collect_stats` (position, domain (default "target"), batch_size...).
    """
    if mode not in RESCORE_MODES:
        raise AdaptError(f"unknown rescore mode {mode!r}: use one of {', '.join(RESCORE_MODES)}")
    kw.setdefault("domain", "target")
    kw.setdefault("fire_min", (cfg or harmful_mod.HarmfulConfig()).fire_min)
    stats = harmful_mod.collect_stats(sae, data, prompts, **kw)
    res = harmful_mod.select_latents(stats, cfg)
    if mode == "reselect":
        return res
    keep = list(harmful)
    new = [j for j in res.indices if j not in set(harmful)]
    if mode == "union":
        keep += new
    elif mode == "guarded":
        keep = guarded_union(sae, data, prompts, keep, new, kw.get("position"))
    sel = res.selection
    safe = stats.mean(0).float().cpu()
    res.indices = keep
    res.scores = [float(sel[j]) for j in keep]
    res.safe_values = [float(safe[j]) for j in keep]
    return res


def guarded_union(sae, data, prompts, keep: list[int], new: list[int], position) -> list[int]:
    """`keep` plus those of `new`, tried in order, that do not lower the per-image separation (rescore mode
    `guarded`). The stored tokens are encoded once; each trial only sums another column of their codes."""
    from ..steering import PositionSteerer
    from .routing.scores import auroc

    records = data.prompts if prompts is None else prompts
    safe = [i for i, r in enumerate(records) if r.label == "safe" and r.domain == "source"]
    unsafe = [i for i, r in enumerate(records) if r.label == "unsafe"]
    latents = keep + new
    steerer = PositionSteerer(sae, torch.tensor(latents, dtype=torch.long))
    (c_safe, g_safe), (c_unsafe, g_unsafe) = (harmful_mod.image_codes(data, position, steerer, idx)
                                              for idx in (safe, unsafe))
    if not g_safe.numel() or not g_unsafe.numel():
        return latents  # nothing to measure the separation on: the plain union

    def separation(cols):
        return auroc(harmful_mod.image_peaks(c_unsafe[:, cols].sum(-1), g_unsafe),
                     harmful_mod.image_peaks(c_safe[:, cols].sum(-1), g_safe))

    cols = list(range(len(keep)))
    best = separation(cols) if cols else 0.0
    for c in range(len(keep), len(latents)):
        trial = separation(cols + [c])
        if trial >= best:
            cols, best = cols + [c], trial
    return [latents[c] for c in cols]


# ---------------------------------------------------------------------------------------------------
# Store level: `safedig adapt`
# ---------------------------------------------------------------------------------------------------

def adapt_store(dictionary_path: str, store: Any, out_path: str, positions: list | None = None,
                cfg: AdaptConfig | None = None, *, rescore: str | None = None,
                harmful_cfg: harmful_mod.HarmfulConfig | None = None, device: Any = None, progress: bool = True,
                should_stop: Callable[[], bool] | None = None, ranks: Ranks = SINGLE) -> dict:
    """Adapt every (chosen) position of a dictionary on the store's target-domain rows, replaying its
    source-domain rows; write the dictionary to `out_path` after each position (unadapted positions are
    copied as they were; provenance lists the adapted ones). Returns {position name: metrics}. With several
    `ranks` each position is adapted by its team (`Ranks.assign`), whose leader leaves the entry in
    `<out_path>.<position>.entry.safetensors`, and rank 0 writes the whole dictionary."""
    from ..formats.dictionary import DictionaryError, load, save

    cfg = cfg or AdaptConfig()
    d = load(dictionary_path)
    if d.family != store.family:
        raise AdaptError(f"{dictionary_path} is a {d.family.upper()} dictionary, the store holds {store.family.upper()} activations")
    positions = list(positions if positions is not None else d.positions)
    have = set(store.positions)
    tgt, src = domain_prompts(store, "target"), domain_prompts(store, "source")
    if not tgt:
        raise AdaptError("the store has no target-domain prompts: nothing to adapt to")
    for p in positions:
        if p not in d.entries:
            raise DictionaryError(f"{dictionary_path}: has no position {p}")
        if p not in have:
            raise AdaptError(f"the store has no activations for position {p}")
        if store.width(p) != d.entries[p].sae.d:
            raise AdaptError(f"position {p}: width {store.width(p)} in the store but {d.entries[p].sae.d} in the dictionary")
    adapted, report = [], {}
    teams = ranks.teams(len(positions))
    for j, p in enumerate(positions):
        team = teams.get(j)
        if team is None:
            continue
        e = d.entries[p]
        cb = tqdm_progress(f"adapt {p}", cfg.steps) if progress and team.leader else None
        try:
            res = adapt_decoder(e.sae, store, store if src else None, cfg, harmful=e.harmful, position=p,
                                target_prompts=tgt, source_prompts=src or None, device=device, progress=cb,
                                should_stop=should_stop, team=team)
        finally:
            if cb is not None:
                cb.close()
        if res.stopped:
            raise KeyboardInterrupt
        if not team.leader:
            continue
        e.sae = res.sae.cpu().requires_grad_(False)
        metrics = dict(res.metrics)
        if rescore:
            hs = rescore_harmful(e.sae, store, store.prompts, e.harmful, rescore, harmful_cfg, position=p,
                                 batch_size=cfg.batch_size)
            e.harmful, e.scores, e.safe_values = hs.indices, hs.scores, hs.safe_values
            metrics.update({f"target_{k}": v for k, v in hs.metadata().items()})
        e.metrics = {**e.metrics, **metrics}
        adapted.append(str(p))
        report[str(p)] = metrics
        if ranks.world > 1:
            save(replace(d, entries={p: e}, provenance={"adapt_metrics": json.dumps(metrics)}), _entry_path(out_path, p))
        else:
            d.provenance = {**d.provenance, "adapted": ",".join(adapted)}
            save(d, out_path)
    if ranks.world > 1:
        ranks.barrier()
        for j, p in enumerate(positions):
            if j not in teams or not teams[j].leader:
                part = load(_entry_path(out_path, p))
                d.entries[p] = part.entries[p]
                report[str(p)] = json.loads(part.provenance["adapt_metrics"])
        report = {str(p): report[str(p)] for p in positions}
        d.provenance = {**d.provenance, "adapted": ",".join(report)}
        if ranks.main:
            save(d, out_path)
        ranks.barrier()
        if ranks.main:  # the per-rank parts sit next to the user's file: not left behind
            for p in positions:
                os.remove(_entry_path(out_path, p))
    return report


def _entry_path(out_path: str, p) -> str:
    return f"{os.path.splitext(out_path)[0]}.{p}.entry.safetensors"


