"""A tqdm progress bar as the step callback of training and adaptation (the CLI shows it; nodes pass their own)."""
from __future__ import annotations

import sys

from tqdm import tqdm


def tqdm_progress(desc: str, total: int):
    """A progress callback drawing a tqdm bar; call `.close()` on the returned callback when done."""
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)
    shown = [None]

    def cb(step, total_, last):
        bar.update(step - bar.n)
        if last is not None and last is not shown[0]:
            shown[0] = last
            post = {k: last[k] for k in ("fvu", "l0", "dead_frac", "fvu_target", "fvu_source") if k in last}
            bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()}, refresh=False)

    cb.close = bar.close
    return cb
