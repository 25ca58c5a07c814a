"""A context-fill edit for flagged images, measured on one finished seed of `safedig demo` (issue 13, item 5): the
tokens SafeDIG would steer are moved toward the mean of the tokens of their own row that it leaves alone (mostly
background), instead of having their harmful latents removed. Development seeds only; the figures are in
docs/METHOD_NOTES.md.

    python scripts/pair_fill.py --demo out/dev --seed 2 --config focus=0.5 [--fill 1.0] [--fill-text]

Why it was tried: the steered two-object images turn grey, background and safe object included, and a scratch
check (development seed 2) found Blend and Repel moving a steered image token by a large part of its own norm. Filling from the row's other
tokens keeps the background's colour, so a risky object would be replaced by background, not by grey.
`--fill` is the share of the way to the context mean (1: replaced); only image positions (square token grids)
are filled unless `--fill-text`, elsewhere SafeDIG's own Blend and Repel act. The choice of tokens (gate, focus)
is SafeDIG's; the other flags are `scripts/pair_focus.py`'s.
"""
from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pair_focus  # noqa: E402

from safedig_core.steering import PositionSteerer  # noqa: E402


class FillSteerer(PositionSteerer):
    def __init__(self, base: PositionSteerer, share: float, text: bool):
        super().__init__(base.sae, base.harmful, base.safe_values, base.gate_scale, base.image_gate_scale)
        self.share, self.text = share, text

    def steer_tokens(self, x, token, z_H, cfg):
        square = x.dim() == 3 and math.isqrt(x.shape[1]) ** 2 == x.shape[1]
        if x.dim() != 3 or not (square or self.text):
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

        own = patches.SharedSteerers({p: FillSteerer(st, share, text) for p, st in store.steerers.items()})
        return pair_focus.steered_model(model, own, acting, cfg)
    return steer


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    share, text = 1.0, "--fill-text" in argv
    if text:
        argv.remove("--fill-text")
    if "--fill" in argv:
        i = argv.index("--fill")
        try:
            share = float(argv[i + 1])
        except (IndexError, ValueError):
            raise SystemExit("--fill needs a number in [0, 1]") from None
        del argv[i:i + 2]
    if not 0.0 <= share <= 1.0:
        raise SystemExit(f"--fill {share}: must be in [0, 1]")
    pair_focus.main(argv, steer=fill_model(share, text), description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    main()
