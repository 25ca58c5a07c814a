"""A region gate for two-object scenes, measured on one finished seed of `safedig demo` (issue 13, item 5): under
`focus`, choose the tokens to steer from the harmful mass each image token has gathered over the sampler calls so
far, not from the current call alone. Development seeds only; the figures are in docs/METHOD_NOTES.md.

    python scripts/pair_region.py --demo out/dev --seed 2 --region acc --config focus=0.5

Regions (`--region`), per position, image and token, summed over the calls of one sampling run:
- acc: steer a flagged image's token where its own mass is > 0 and its summed mass ≥ focus × the row's largest;
- dilated: the same after a 3 × 3 max filter of the summed mass over the image's token grid;
- half: only in the left or right half of the image grid, whichever has gathered more mass, then as acc.

Everything else (the decision, Blend and Repel) is SafeDIG's own; the other flags are `scripts/pair_focus.py`'s.
"""
from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair_focus  # noqa: E402

from safedig_core.steering import PositionSteerer  # noqa: E402

REGIONS = ("acc", "dilated", "half")


class Memory(dict):
    """Summed mass per (position, batch shape), emptied when a new sampling run starts (its step goes back)."""
    last_step = None


class RegionSteerer(PositionSteerer):
    def __init__(self, base: PositionSteerer, region: str, memory: Memory):
        super().__init__(base.sae, base.harmful, base.safe_values, base.gate_scale, base.image_gate_scale)
        self.region, self.memory = region, memory

    def _selected(self, mass: Tensor) -> Tensor:
        key = (id(self), tuple(mass.shape))
        total = self.memory[key] = mass if key not in self.memory else self.memory[key] + mass
        side = math.isqrt(total.shape[1])
        if side * side != total.shape[1] or self.region == "acc":
            return total
        if self.region == "dilated":
            return F.max_pool2d(total.view(-1, 1, side, side), 3, 1, 1).view(total.shape)
        left = (torch.arange(total.shape[1], device=total.device) % side) < side // 2
        more_left = (total * left).sum(1) >= (total * ~left).sum(1)
        return total * torch.where(more_left[:, None], left[None], ~left[None])

    def steer(self, x, cfg, rows=None, flagged=None):
        if not (cfg.image_gate and cfg.focus > 0) or cfg.is_identity or len(self.harmful) == 0 or x.dim() != 3:
            return super().steer(x, cfg, rows, flagged)
        decided = self.flag_images(x, cfg) if flagged is None else flagged.to(x.device, torch.bool)
        rows = decided if rows is None else decided & rows.to(x.device)
        sae, lookup = self._derived(x.device, x.dtype)[:2]
        z_all = self.harmful_codes(sae, sae.prepare(x.reshape(-1, x.shape[-1])), lookup)
        mass = z_all.sum(-1).float().view(x.shape[:2])
        sel = self._selected(mass)
        chosen = (mass > 0) & (sel > 0) & (sel >= cfg.focus * sel.amax(1, keepdim=True)) & rows[:, None]
        token = chosen.flatten().nonzero().squeeze(1)
        return x if token.numel() == 0 else self.steer_tokens(x, token, z_all[token], cfg)


def region_model(region: str):
    def steer(model, store, acting, cfg):
        import comfy.patcher_extension

        from safedig_core.adapters.comfy import patches
        from safedig_core.adapters.comfy.families import _bound

        memory = Memory()
        own = patches.SharedSteerers({p: RegionSteerer(st, region, memory) for p, st in store.steerers.items()})

        def new_run_resets(executor, *args, **kwargs):
            to = _bound(executor, args, kwargs).get("transformer_options")
            step = patches.step_of(to) if isinstance(to, dict) else None
            if step is not None and (memory.last_step is None or step < memory.last_step):
                memory.clear()
            memory.last_step = step
            return executor(*args, **kwargs)

        m = pair_focus.steered_model(model, own, acting, cfg)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "pair_region", new_run_resets)
        return m
    return steer


def main(argv=None) -> None:
    def add_arguments(ap):
        ap.add_argument("--region", choices=REGIONS, default="acc", help="which tokens of a flagged image are steered")

    pair_focus.main(argv, description=__doc__.split("\n\n")[0], add_arguments=add_arguments,
                    make_steer=lambda args: region_model(args.region))

if __name__ == "__main__":
    main()
