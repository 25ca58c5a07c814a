"""A context-fill edit for flagged images, measured on one finished seed of `safedig demo` (issue 13, item 5): the
tokens SafeDIG would steer are moved toward the mean of the tokens of their own row that it leaves alone (mostly
background), instead of having their harmful latents removed. Development seeds only; the figures are in
docs/METHOD_NOTES.md.

    python scripts/pair_fill.py --demo out/dev --seed 2 --config focus=0.5 [--fill 1.0] [--fill-text]

Why it was tried: the steered two-object images turn grey, background and safe object included, and Blend and
Repel move a steered image token by a large part of its own norm (`scripts/pair_focus.py --shift`). Filling from the
row's other tokens should replace a risky object by background, not by grey.
`--fill` is the share of the way to the context mean (1: replaced); only image positions are filled unless
`--fill-text`, elsewhere SafeDIG's own Blend and Repel act. The choice of tokens (gate, focus)
is SafeDIG's; the other flags are `scripts/pair_focus.py`'s.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair_focus  # noqa: E402

from safedig_core.steering import PositionSteerer  # noqa: E402


class FillSteerer(PositionSteerer):
    def __init__(self, base: PositionSteerer, share: float, fill: bool):
        super().__init__(base.sae, base.harmful, base.safe_values, base.gate_scale, base.image_gate_scale)
        self.share, self.fill = share, fill

    def steer_tokens(self, x, token, z_H, cfg):
        if x.dim() != 3 or not self.fill:
            return super().steer_tokens(x, token, z_H, cfg)
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        left = torch.ones(B * T, dtype=torch.bool, device=x.device)
        left[token] = False
        keep = left.view(B, T, 1).to(torch.float32)
        context = (x.float() * keep).sum(1) / keep.sum(1).clamp_min(1)  # [B, d]: the row's untouched tokens
        old = flat[token].float()
        new = old + self.share * (context[token // T] - old)
        out = flat.clone()
        out[token] = new.to(x.dtype)
        return out.view(x.shape)


def fill_model(share: float, text: bool):
    def steer(model, store, acting, cfg):
        from safedig_core.adapters.comfy import patches

        own = patches.SharedSteerers({p: FillSteerer(st, share, text or p.stream == "img")
                                      for p, st in store.steerers.items()})
        return pair_focus.steered_model(model, own, acting, cfg)
    return steer


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"--fill {text}: must be in [0, 1]")
    return value


def main(argv=None) -> None:
    def add_arguments(ap):
        ap.add_argument("--fill", type=_share, default=1.0, help="share of the way to the context mean (1: replaced)")
        ap.add_argument("--fill-text", action="store_true", help="fill at the text positions too")

    pair_focus.main(argv, description=__doc__.split("\n\n")[0], add_arguments=add_arguments,
                    make_steer=lambda args: fill_model(args.fill, args.fill_text))

if __name__ == "__main__":
    main()
