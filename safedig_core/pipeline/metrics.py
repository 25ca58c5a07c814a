"""How good an SAE is: FVU, L0 and dead latents on held data, and the spliced error — how much the model's own
output changes when the reconstruction replaces the activation (docs/METHOD_NOTES.md §4: the quality that matters)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..sae import SparseAutoencoder
from .data import Stream, TrainError, batch_x, checked
from .decoder import decode_scaled


@torch.no_grad()
def sae_quality(sae: SparseAutoencoder, data: Any, *, position: Any = None, prompts: Any = None,
             batch_size: int = 4096, max_batches: int | None = None) -> dict:
    """FVU (against the data's own mean), mean L0 and the fraction of latents that never fired, in one
    streamed pass (float64 sums). TopK SAEs only."""
    stream = Stream(data, position, batch_size, prompts, shuffle=False)
    dev = sae.W_dec.device
    n, err, s1, s2 = 0, 0.0, torch.zeros(sae.d, dtype=torch.float64, device=dev), 0.0
    l0 = 0.0
    fired = torch.zeros(sae.latents, dtype=torch.bool, device=dev)
    for i, b in enumerate(stream.epoch(0)):
        if max_batches is not None and i >= max_batches:
            break
        x = checked(batch_x(b), sae.d, f"batch {i}").to(dev, sae.W_dec.dtype)
        if not len(x):
            continue
        xs = sae.prepare(x)
        vals, idx = sae.encode_sparse(xs)
        e = xs - decode_scaled(sae, vals, idx)
        n += x.shape[0]
        err += float(e.double().pow(2).sum())
        s1 += xs.double().sum(0)
        s2 += float(xs.double().pow(2).sum())
        active = vals > 0
        l0 += float(active.sum())
        fired[idx[active]] = True
    if n == 0:
        raise TrainError("no activations to evaluate on")
    total = s2 - float(s1.pow(2).sum()) / n
    return {"fvu": err / max(total, 1e-30), "l0": l0 / n, "dead_frac": 1.0 - float(fired.double().mean()),
            "tokens": n}


def splice(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    """The replacement to put at the position when measuring the spliced error: x [..., d] → x̂ in x's
    dtype and device (the SAE must already be on that device)."""

    @torch.no_grad()
    def replace(x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_dec.dtype)
        return sae(flat).to(x.dtype).reshape(x.shape)

    return replace


@torch.no_grad()
def spliced_error(run: Callable[[Any], tuple], inputs: Iterable[Any]) -> dict:
    """The model-level reconstruction error (docs/METHOD_NOTES.md §4): how much the model's prediction changes when
    the SAE's reconstruction replaces the activation at the position.

    `run(item)` runs the model twice on one input — once untouched and once with the activation at the
    position replaced (typically by `splice(sae)`) — and returns `(clean, spliced)` predictions, or
    `(clean, spliced, target)` when the training target of the prediction is known (for a diffusion
    model, e.g. the noise or velocity the prediction should match). Sums are over all items:
    - `rel_change` = Σ‖spliced − clean‖² / Σ‖clean‖²: how much splicing moves the prediction;
    - with targets, `loss_clean` and `loss_spliced` (MSE to the target) and `loss_increase`
      = (loss_spliced − loss_clean) / loss_clean, the relative extra prediction error.
    """
    n_items, n_el, change, norm, lc, ls = 0, 0, 0.0, 0.0, 0.0, 0.0
    with_target = None
    for item in inputs:
        out = run(item)
        if len(out) not in (2, 3):
            raise ValueError("spliced_error: run(item) must return (clean, spliced) or (clean, spliced, target)")
        has_t = len(out) == 3
        if with_target is None:
            with_target = has_t
        elif with_target != has_t:
            raise ValueError("spliced_error: run(item) returned a target for some items and not others")
        clean, spl = out[0].double(), out[1].double()
        if clean.shape != spl.shape:
            raise ValueError(f"spliced_error: clean {list(clean.shape)} and spliced {list(spl.shape)} predictions differ in shape")
        change += float((spl - clean).pow(2).sum())
        norm += float(clean.pow(2).sum())
        if has_t:
            t = out[2].double()
            lc += float((clean - t).pow(2).sum())
            ls += float((spl - t).pow(2).sum())
        n_items += 1
        n_el += clean.numel()
    if n_items == 0:
        raise ValueError("spliced_error: no inputs")
    res = {"items": n_items, "rel_change": change / max(norm, 1e-30)}
    if with_target:
        res.update(loss_clean=lc / n_el, loss_spliced=ls / n_el, loss_increase=(ls - lc) / max(lc, 1e-30))
    return res
