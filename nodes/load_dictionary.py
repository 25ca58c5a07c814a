"""SafeDIG Load Dictionary: a safety dictionary file from `models/sae/` onto a SAFEDIG_DICTIONARY socket.

Only a file the dropdown lists is opened (`paths.dictionary_file`): whatever a graph names, nothing outside
`models/sae` (and its extra_model_paths.yaml entries) is read."""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from ..safedig_core.adapters.comfy.patches import SharedSteerers
from ..safedig_core.formats import dictionary
from . import paths
from .api import CATEGORY, DICTIONARY, io

FOLDER = "sae"


def register_folder() -> None:
    """`models/sae/` plus any `sae:` entries of extra_model_paths.yaml, safetensors files only."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, exts = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | {".safetensors"})


@dataclass
class LoadedDictionary:
    """What travels on the SAFEDIG_DICTIONARY socket: the file's content and its shared SAE store."""
    name: str
    dictionary: dictionary.SafetyDictionary
    store: SharedSteerers

    @classmethod
    def from_file(cls, path: str, name: str | None = None) -> "LoadedDictionary":
        d = dictionary.load(path)
        store = SharedSteerers({p: e.steerer() for p, e in d.entries.items()})
        return cls(name or os.path.basename(path), d, store)


class SafeDIGLoadDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGLoadDictionary",
            display_name="SafeDIG Load Dictionary",
            category=CATEGORY,
            description="Load a SafeDIG safety dictionary (one sparse autoencoder per DiT position, with its "
                        "harmful latents) from models/sae/.",
            inputs=[io.Combo.Input("dictionary_name", options=paths.listed(FOLDER),
                                   tooltip="A .safetensors safety dictionary in models/sae/")],
            outputs=[DICTIONARY.Output(display_name="dictionary")],
        )

    @classmethod
    def fingerprint_inputs(cls, dictionary_name):
        try:
            return os.path.getmtime(paths.dictionary_file(FOLDER, dictionary_name))  # reload when the file changes
        except (paths.PathRefused, OSError):
            return dictionary_name

    @classmethod
    def execute(cls, dictionary_name) -> io.NodeOutput:
        path = paths.dictionary_file(FOLDER, dictionary_name)
        try:
            return io.NodeOutput(LoadedDictionary.from_file(path, dictionary_name))
        except dictionary.DictionaryError as e:  # name the file as the list does, not by its path on the server
            raise dictionary.DictionaryError(str(e).replace(path, dictionary_name)) from None
