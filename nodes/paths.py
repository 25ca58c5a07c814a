"""Paths that come from a graph. A ComfyUI server is a network service: whoever can queue a prompt can type
any string into a node's inputs, so every path a node takes is a name inside one of ComfyUI's own folders
(input for prompt files, output for activation stores, `models/sae` for dictionaries), resolved after
symlinks and checked to stay inside. Anything else gets one line that names the rule and says nothing about
the file system (not whether a path exists, not where the folders are). The CLI, run by the machine's own
user, does not come through here and keeps taking any path.
"""
from __future__ import annotations

import os
import re

import folder_paths

from ..safedig_core.formats.messages import quoted

STORE_FOLDER = "safedig_activations"  # activation stores: <output>/safedig_activations/<name>/
WORK_FOLDER = "safedig_builds"  # Build Dictionary's work folders: <output>/safedig_builds/<name>.work/
_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class PathRefused(ValueError):
    """A path from a graph that leaves its folder, or names nothing there."""


def _parts(name: str) -> list[str] | None:
    """The components of a relative name, or None for an absolute one, '..', a drive, a NUL, ..."""
    raw = name.strip().strip('"').replace("\\", "/")
    if not raw or "\0" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or raw.startswith("~"):
        return None
    parts = [p for p in raw.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        return None
    return parts


def _inside(root: str, path: str) -> bool:
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path != root and os.path.commonpath([root, path]) == root


def input_file(name: str, what: str = "prompt file") -> str:
    """A file in ComfyUI's input folder (subfolders allowed); its real path."""
    parts = _parts(name)
    refused = PathRefused(f"{what} {quoted(name.strip())}: give the name of a file in ComfyUI's input folder "
                          "(e.g. prompts.csv or sets/prompts.jsonl; no absolute paths, no '..'), and check it is there")
    if parts is None:
        raise refused
    root = folder_paths.get_input_directory()
    path = os.path.join(root, *parts)
    if not _inside(root, path) or not os.path.isfile(path):
        raise refused  # the same words for missing and for a symlink out of the folder
    return os.path.realpath(path)


def _output_name(name: str, what: str) -> list[str]:
    parts = _parts(name)
    if parts is None or not all(_PART.match(p) for p in parts):
        raise PathRefused(f"{what} {quoted(name.strip())}: use letters, digits, '.', '_', '-' and '/' for subfolders "
                          "(no '..', no absolute paths)")
    return parts


def store_dir(name: str, must_exist: bool = False, what: str = "store") -> str:
    """The store folder of an output name: `<output>/safedig_activations/<name>` (subfolders allowed)."""
    parts = _output_name(name, what)
    root = os.path.join(folder_paths.get_output_directory(), STORE_FOLDER)
    path = os.path.join(root, *parts)
    if not _inside(root, path):
        raise PathRefused(f"{what} {quoted(name.strip())}: it leads out of output/{STORE_FOLDER}/")
    if must_exist and not os.path.isfile(os.path.join(path, "manifest.json")):
        raise PathRefused(f"store {quoted(name.strip())}: no activation store of that name in output/{STORE_FOLDER}/ "
                          "(give the output name used in SafeDIG Collect Activations)")
    return path


def display(path: str) -> str:
    """A path under ComfyUI's output folder as `output/...`, for text shown to clients."""
    out = os.path.realpath(folder_paths.get_output_directory())
    real = os.path.realpath(path)
    if os.path.commonpath([out, real]) == out:
        return "output/" + os.path.relpath(real, out).replace(os.sep, "/")
    return os.path.basename(real)


def dictionary_target(folder: str, name: str) -> tuple[str, str]:
    """(file name, path) for a new dictionary in the first folder of `models/<folder>`: a plain file name."""
    raw = name.strip()
    if not raw or not _PART.match(raw):
        raise PathRefused(f"dictionary name {quoted(raw)}: a plain file name (letters, digits, '.', '_', '-'; "
                          "no folders)")
    if not raw.endswith(".safetensors"):
        raw += ".safetensors"
    root = folder_paths.get_folder_paths(folder)[0]
    path = os.path.join(root, raw)
    if not _inside(root, path):
        raise PathRefused(f"dictionary name {quoted(raw)}: it leads out of models/{folder}/")
    return raw, path


def work_dir(dictionary_file: str) -> str:
    """Build Dictionary's work folder for a dictionary file name: under output/, never in `models/sae`
    (whose `.safetensors` files, checkpoints included, would be listed as dictionaries)."""
    stem = os.path.splitext(dictionary_file)[0]
    return os.path.join(folder_paths.get_output_directory(), WORK_FOLDER, stem + ".work")


def dictionary_file(folder: str, name: str) -> str:
    """The path of a dictionary the Load Dictionary dropdown lists (`name` as it lists it)."""
    if not isinstance(name, str) or name not in listed(folder):
        raise PathRefused(f"safety dictionary {quoted(name)} is not in models/{folder}/ (pick one from the list; "
                          "new files appear after a refresh)")
    path = folder_paths.get_full_path(folder, name)
    if path is None or not os.path.isfile(path):
        raise PathRefused(f"safety dictionary {quoted(name)} is not in models/{folder}/ (pick one from the list)")
    return path


def listed(folder: str) -> list[str]:
    """The dictionaries of `models/<folder>`: `.safetensors` files, not those inside a `*.work` folder (training
    checkpoints of `safedig build`, whose default work folder sits beside its output)."""
    return [n for n in folder_paths.get_filename_list(folder)
            if not any(part.endswith(".work") for part in n.replace("\\", "/").split("/")[:-1])]
