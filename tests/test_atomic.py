"""atomic.py: a write that fails leaves the old file whole and no temporary file behind; stale temporaries of a
killed writer are found by name."""
from __future__ import annotations

import os

import pytest

from safedig_core.formats.atomic import remove_stale, replacing, write_text


def test_write_replaces_whole_and_failure_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "sub" / "report.json")
    write_text(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path / "sub") == ["report.json"]
    write_text(path, "new")
    assert open(path).read() == "new" and os.listdir(tmp_path / "sub") == ["report.json"]


def test_remove_stale_takes_only_this_files_temporaries(tmp_path):
    path = str(tmp_path / "a.ckpt")
    for name in (".a.ckpt.x1y2.tmp", ".b.ckpt.x1y2.tmp", "a.ckpt", ".a.ckpt.keep"):
        (tmp_path / name).write_text("x")
    remove_stale(path)
    assert sorted(os.listdir(tmp_path)) == [".a.ckpt.keep", ".b.ckpt.x1y2.tmp", "a.ckpt"]


def test_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    """A dictionary written by one user must stay readable by the ComfyUI server running as another."""
    mask = os.umask(0o022)
    try:
        path = write_text(str(tmp_path / "d.safetensors"), "x")
    finally:
        os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o644
