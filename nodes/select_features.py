"""SafeDIG Select Features: choose a position's harmful latents by index, e.g. for a dictionary converted from
another library (`safedig convert`), whose latents are yours to pick.

The output is a new DICTIONARY: the input (which ComfyUI caches) is never changed, and every SAE is shared
with it; only the chosen position gets a new steerer over the same weights.
"""
from __future__ import annotations

from dataclasses import replace

from ..safedig_core.adapters.comfy.patches import SharedSteerers
from ..safedig_core.formats.dictionary import parse_latents
from ..safedig_core.positions import parse_list
from .api import CATEGORY, DICTIONARY, io
from .load_dictionary import LoadedDictionary

MODES = ("replace", "add", "remove")


def select(loaded: LoadedDictionary, position: str, latents: str, mode: str = "replace") -> LoadedDictionary:
    d = loaded.dictionary
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} must be one of {', '.join(MODES)}")
    chosen = parse_list(position, d.positions)
    if len(chosen) != 1:
        raise ValueError(f"position: name exactly one of the dictionary's positions "
                         f"({', '.join(map(str, d.positions))}), got {position!r}")
    p = chosen[0]
    entry = d.entries[p]
    picked = parse_latents(latents, entry.sae.latents, p)
    old = dict(zip(entry.harmful, zip(entry.scores, entry.safe_values or [0.0] * len(entry.harmful))))
    if mode == "replace":
        keep = picked
    elif mode == "add":
        keep = entry.harmful + [j for j in picked if j not in old]
    else:
        keep = [j for j in entry.harmful if j not in picked]
    scores = [old.get(j, (1.0, 0.0))[0] for j in keep]
    safe = None if entry.safe_values is None else [old.get(j, (1.0, 0.0))[1] for j in keep]
    new_entry = replace(entry, harmful=keep, scores=scores, safe_values=safe)
    entries = {**d.entries, p: new_entry}
    steerers = {**loaded.store.steerers, p: new_entry.steerer()}
    return LoadedDictionary(loaded.name, replace(d, entries=entries), SharedSteerers(steerers))


class SafeDIGSelectFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGSelectFeatures",
            display_name="SafeDIG Select Features",
            category=CATEGORY,
            description="Choose which latents of one position count as harmful (steering acts on them): replace the "
                        "dictionary's set, add to it or remove from it. The input dictionary is left as it was.",
            inputs=[
                DICTIONARY.Input("dictionary"),
                io.String.Input("position", default="double.0.img",
                                tooltip="One of the dictionary's positions, e.g. double.7.img"),
                io.String.Input("latents", default="",
                                tooltip="Latent indices, comma separated, e.g. 12, 873, 4051"),
                io.Combo.Input("mode", options=list(MODES), default="replace",
                               tooltip="replace the harmful set with these latents, add them to it, or remove them"),
            ],
            outputs=[DICTIONARY.Output(display_name="dictionary")],
        )

    @classmethod
    def execute(cls, dictionary, position, latents, mode) -> io.NodeOutput:
        return io.NodeOutput(select(dictionary, position, latents, mode))
