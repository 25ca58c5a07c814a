"""nodes/paths.py: every path a graph gives stays inside ComfyUI's folders, after symlinks, and a refusal
says nothing about the file system (the same words for missing, outside and symlinked-out)."""
from __future__ import annotations

import importlib
import os

import pytest

pytestmark = pytest.mark.comfy


@pytest.fixture
def paths(comfy, tmp_path):
    import folder_paths

    mod = importlib.import_module(comfy.NODE_CLASS_MAPPINGS["SafeDIGCollectActivations"].__module__.rsplit(".", 1)[0]
                                  + ".paths")
    for sub in ("input", "output", "sae", "outside"):
        (tmp_path / sub).mkdir()
    old = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    old_sae = folder_paths.folder_names_and_paths.get("sae")
    folder_paths.set_input_directory(str(tmp_path / "input"))
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.folder_names_and_paths["sae"] = ([str(tmp_path / "sae")], {".safetensors"})
    try:
        yield mod, tmp_path
    finally:
        folder_paths.set_input_directory(old[0])
        folder_paths.set_output_directory(old[1])
        if old_sae is not None:
            folder_paths.folder_names_and_paths["sae"] = old_sae


def test_input_files(paths):
    p, tmp = paths
    (tmp / "input" / "sets").mkdir()
    (tmp / "input" / "sets" / "a.csv").write_text("x")
    (tmp / "outside" / "secret.csv").write_text("x")
    os.symlink(tmp / "outside" / "secret.csv", tmp / "input" / "link.csv")
    os.symlink(tmp / "outside", tmp / "input" / "dirlink")
    assert p.input_file("sets/a.csv") == str((tmp / "input" / "sets" / "a.csv").resolve())
    assert p.input_file(" sets\\a.csv ") == str((tmp / "input" / "sets" / "a.csv").resolve())
    words = set()
    for bad in (str(tmp / "outside" / "secret.csv"), "../outside/secret.csv", "link.csv", "dirlink/secret.csv",
                "missing.csv", "sets", "", "C:/x.csv", "~/x", "a\0b", "sets/../../outside/secret.csv"):
        with pytest.raises(p.PathRefused) as e:
            p.input_file(bad)
        msg = str(e.value)
        assert str(tmp) not in msg.replace(repr(bad.strip()), "") and "\n" not in msg
        words.add(msg.replace(repr(bad.strip()), "NAME"))
    assert len(words) == 1, words


def test_store_and_dictionary_names(paths):
    p, tmp = paths
    assert p.store_dir("a/b") == os.path.join(str(tmp / "output"), "safedig_activations", "a", "b")
    for bad in ("../x", "/abs", "a/../../x", "a b", ".hidden", ""):
        with pytest.raises(p.PathRefused):
            p.store_dir(bad)
    (tmp / "output" / "safedig_activations").mkdir()
    os.symlink(tmp / "outside", tmp / "output" / "safedig_activations" / "out")
    with pytest.raises(p.PathRefused, match="leads out of output/safedig_activations/"):
        p.store_dir("out/x")
    with pytest.raises(p.PathRefused, match="no activation store of that name"):
        p.store_dir("nothing", must_exist=True)
    assert p.dictionary_target("sae", "mine") == ("mine.safetensors", str(tmp / "sae" / "mine.safetensors"))
    for bad in ("../mine", "sub/mine", "/abs", ".x", ""):
        with pytest.raises(p.PathRefused, match="a plain file name"):
            p.dictionary_target("sae", bad)
    assert p.work_dir("mine.safetensors") == str(tmp / "output" / "safedig_builds" / "mine.work")


def test_dictionaries_are_only_what_the_list_shows(paths):
    p, tmp = paths
    (tmp / "sae" / "good.safetensors").write_bytes(b"x")
    (tmp / "sae" / "b.work" / "train").mkdir(parents=True)
    (tmp / "sae" / "b.work" / "train" / "double.0.img.ckpt.safetensors").write_bytes(b"x")
    (tmp / "outside" / "o.safetensors").write_bytes(b"x")
    import folder_paths

    folder_paths.filename_list_cache.pop("sae", None)
    assert p.listed("sae") == ["good.safetensors"]
    assert p.dictionary_file("sae", "good.safetensors") == str(tmp / "sae" / "good.safetensors")
    for bad in ("b.work/train/double.0.img.ckpt.safetensors", "../outside/o.safetensors",
                str(tmp / "outside" / "o.safetensors"), "missing.safetensors", None):
        with pytest.raises(p.PathRefused, match="is not in models/sae/"):
            p.dictionary_file("sae", bad)
