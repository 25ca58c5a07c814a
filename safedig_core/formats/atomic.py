"""Crash-safe file writing shared by every module that saves something a user made (stores, checkpoints,
dictionaries, reports, pictures): write a temporary file beside the target, fsync, `os.replace`, fsync the
folder. A reader sees the old file or the new one, never a truncated one."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager, suppress


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


def _tmp_parts(path: str) -> tuple[str, str]:
    return f".{os.path.basename(path)}.", ".tmp"


@contextmanager
def replacing(path: str):
    """Yield a temporary path beside `path` for the caller to write; on success it is fsynced and moved over
    `path`, on any error removed. Temporary names are `.<name>.<random>.tmp` (see `remove_stale`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix, suffix = _tmp_parts(path)
    while True:  # like mkstemp, but with the umask's permissions (mkstemp's 0600 would hide the file from others)
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> str:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def remove_stale(path: str) -> None:
    """Remove temporary files `replacing(path)` left behind when a process was killed mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix, suffix = _tmp_parts(path)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(suffix):
                with suppress(OSError):
                    os.remove(os.path.join(folder, name))


def write_safetensors(path: str, tensors: dict, metadata: dict[str, str]) -> str:
    """A safetensors file written atomically with the umask's permissions (safetensors' own `save_file` leaves
    0600, which hides a shared dictionary or checkpoint from the other users of a server)."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        mode = os.stat(tmp).st_mode & 0o777
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
    return path
