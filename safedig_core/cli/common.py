"""What every `safedig` subcommand shares: the user-error type, Ctrl-C as a polled stop flag, opening a store."""
from __future__ import annotations

import os
import signal
import threading

from ..formats import store


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


class StopFlag:
    """SIGINT (Ctrl-C) sets the flag instead of raising, so training can checkpoint and stop cleanly;
    a second Ctrl-C raises KeyboardInterrupt at once. Use as a context manager; call to poll. `on_first`
    runs at the first Ctrl-C (to say what will happen)."""

    def __init__(self, on_first=None):
        self.stop = False
        self._old = None
        self._on_first = on_first

    def __call__(self) -> bool:
        return self.stop

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.stop:
                    raise KeyboardInterrupt
                self.stop = True
                if self._on_first is not None:
                    self._on_first()
            self._old = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def open_store(path: str):
    """The activation store at `path`; a missing folder is one line, not a traceback."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such activation store folder")
    return store.ActivationStore(path)


def check_sae_size(store, positions, expansion: int | None, latents: int | None, k: int | None,
                   flag: str = "--expansion") -> None:
    """Refuse SAE sizes the dictionary format would refuse (or memory could not hold) before training."""
    from ..formats.dictionary import MAX_LATENTS, MAX_MATRIX

    for p in positions if positions else store.positions:
        d = store.width(p)
        n = latents or (expansion or 16) * d
        if n > MAX_LATENTS or n * d > MAX_MATRIX:
            raise UserError(f"{flag} gives {n} latents at {p} (width {d}): at most {MAX_LATENTS} latents and "
                            f"{MAX_MATRIX} weights per matrix")
        if k is not None and k > n:
            raise UserError(f"-k {k} exceeds the {n} latents at {p} (width {d})")
