"""Crash-safe file writing shared by every module that saves something a user made (stores, checkpoints,
dictionaries, reports): write a temporary file beside the target, fsync, `os.replace`, fsync the folder."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename inside folder `path` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
