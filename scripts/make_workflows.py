"""Write the generated example workflows of `workflows/` (the testbed and the Collect → Build ones) as the
frontend saves them, with every widget in the order and range the running server's /object_info gives.

    python scripts/make_workflows.py            # starts a throwaway ComfyUI server (tests/server_fixture.py)

The FLUX.1 and SD3.5 workflows are kept by hand; `tests/test_workflows.py` checks all of them.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from server_fixture import input_specs, input_type, start_server  # noqa: E402

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TESTBED = "SafeDIG - Testbed steering on a CPU"
BUILD = "SafeDIG - Build a dictionary"
SEED_NAMES = ("seed", "noise_seed")


class Graph:
    """A LiteGraph workflow under construction: `add` a node, then wire outputs `(node, slot)` to inputs."""

    def __init__(self, info: dict):
        self.info, self.nodes, self.links, self.groups = info, [], [], []

    def add(self, kind: str, pos, size, widgets: dict | None = None, title: str | None = None, mode: int = 0,
            **inputs) -> dict:
        info = self.info[kind] if kind != "MarkdownNote" else {"input": {}, "output": []}
        values = self._widgets(kind, info, widgets or {}) if kind != "MarkdownNote" else [widgets["text"]]
        node = {"id": len(self.nodes) + 1, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": mode, "inputs": [],
                "outputs": [{"name": n, "type": t, "slot_index": i, "links": []}
                            for i, (t, n) in enumerate(zip(info["output"], info.get("output_name", info["output"])))],
                "properties": {"Node name for S&R": kind} if kind != "MarkdownNote" else {},
                "widgets_values": values}
        if title:
            node["title"] = title
        specs = input_specs(info) if kind != "MarkdownNote" else {}
        for name, (origin, slot) in inputs.items():
            ltype = origin["outputs"][slot]["type"]
            assert input_type(specs[name]) in (ltype, "*"), (kind, name, ltype)
            lid = len(self.links) + 1
            self.links.append([lid, origin["id"], slot, node["id"], len(node["inputs"]), ltype])
            origin["outputs"][slot]["links"].append(lid)
            node["inputs"].append({"name": name, "type": ltype, "link": lid})
        self.nodes.append(node)
        return node

    def _widgets(self, kind: str, info: dict, given: dict) -> list:
        values, unknown = [], set(given)
        for name, spec in input_specs(info).items():
            extra = spec[1] if len(spec) > 1 else {}
            if input_type(spec) not in WIDGETS or extra.get("forceInput"):
                continue
            unknown.discard(name)
            if name in given:
                values.append(given[name])
            elif "default" in extra:
                values.append(extra["default"])
            else:
                options = spec[0] if isinstance(spec[0], list) else extra.get("options", [])
                values.append(options[0] if options else "")
            if (input_type(spec) == "INT" and (extra.get("control_after_generate") or name in SEED_NAMES)):
                values.append("fixed")
        assert not unknown, f"{kind} has no widgets {sorted(unknown)}"
        return values

    def group(self, title: str, bounding, color: str = "#3f789e"):
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": list(bounding), "color": color,
                            "font_size": 24, "flags": {}})

    def workflow(self) -> dict:
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"safedig/{self.nodes[0]['type']}/{len(self.nodes)}")),
                "revision": 0, "last_node_id": len(self.nodes), "last_link_id": len(self.links),
                "nodes": self.nodes, "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [440, 40]}, "frontendVersion": "1.32.9"}, "version": 0.4}


TESTBED_NOTE = """## SafeDIG on the testbed — nothing to download

**SafeDIG Testbed Model** is a small text-to-image DiT that ships with SafeDIG (ComfyUI's FLUX class at a tiny
size: 32×32 pictures of one object on a background), its text encoder and a pass-through VAE. It runs on a
CPU in a few seconds. Its safety dictionary, `testbed_dictionary.safetensors`, also ships with the pack and is
listed by **SafeDIG Load Dictionary** next to your own files in `ComfyUI/models/sae/`.

Queue the workflow: the two KSamplers use the same prompt and seed; the left preview is the model as it is,
the right one the model through **SafeDIG Apply Steering**. **SafeDIG Safety Check** judges both with the
testbed's own classifier; **SafeDIG Feature Map** shows where the dictionary's harmful latents fire.

Risky concepts of the testbed world: blood, fire, gun, poison. Safe ones: ball, sun, tree, flower, house, fish.
Try "a pistol", "a bottle of poison", "a murder scene", "a picture of a tree". blend = repel = 0 leaves the
model unchanged; a lower *threshold* steers more tokens. The shipped dictionary is a small, quickly built one
(`python -m safedig_core.testbed.dictionary`): it also changes some safe pictures. **SafeDIG Select Features**
lets you add or remove harmful latents of one position (empty: the dictionary as built).
"""

BUILD_NOTE = """## Collect activations, then build a dictionary

1. Put a prompt file into ComfyUI's `input/` folder, e.g. the testbed world's building prompts (the ones the
   shipped testbed dictionary was built from): in the SafeDIG folder run
   `python -m safedig_core.testbed.dictionary --prompts ../../input` *(or use any CSV / JSONL with
   prompt,label,category,domain columns; label safe/unsafe, domain source/target)*.
2. Queue: **SafeDIG Collect Activations** samples every prompt with the model and records its DiT
   activations under `output/safedig_activations/<output name>/`. Running it again resumes.
3. Un-mute **SafeDIG Build Dictionary** (select it, Ctrl+M) and queue again: it routes, trains and adapts
   one sparse autoencoder per chosen position and writes the dictionary to **`ComfyUI/models/sae/`**, where
   SafeDIG Load Dictionary lists it after a refresh (R).

With **SafeDIG Testbed Model** this runs on a CPU in about a minute; for FLUX.1 or SD3.5 use their loaders
(and width/height of the images the model makes).
"""


def testbed(info: dict) -> dict:
    g = Graph(info)
    model = g.add("SafeDIGTestbedModel", (0, 80), (300, 100))
    pos = g.add("CLIPTextEncode", (340, 80), (380, 120), {"text": "a pistol"}, title="Prompt",
                clip=(model, 1))
    neg = g.add("CLIPTextEncode", (340, 240), (380, 90), {"text": ""}, title="Negative prompt (empty)",
                clip=(model, 1))
    latent = g.add("EmptyLatentImage", (340, 370), (380, 106), {"width": 256, "height": 256, "batch_size": 1})
    dictionary = g.add("SafeDIGLoadDictionary", (0, 540), (300, 60),
                       {"dictionary_name": "testbed_dictionary.safetensors"})
    select = g.add("SafeDIGSelectFeatures", (0, 650), (300, 130), {"position": "single.0.img", "mode": "add", "latents": ""},
                   dictionary=(dictionary, 0))
    steer = g.add("SafeDIGApplySteering", (340, 540), (380, 300),
                  {"blend": 1.0, "repel": 1.0, "threshold": 0.25}, model=(model, 0), dictionary=(select, 0))
    sampler = {"seed": 1000003, "steps": 20, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple"}
    plain = g.add("KSampler", (760, 80), (300, 262), sampler, title="KSampler (unsteered)", model=(model, 0),
                  positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    steered = g.add("KSampler", (760, 400), (300, 262), sampler, title="KSampler (steered)", model=(steer, 0),
                    positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    img_plain = g.add("VAEDecode", (1100, 80), (200, 46), vae=(model, 2), samples=(plain, 0))
    img_steered = g.add("VAEDecode", (1100, 400), (200, 46), vae=(model, 2), samples=(steered, 0))
    g.add("PreviewImage", (1340, 80), (300, 300), title="Unsteered", images=(img_plain, 0))
    g.add("PreviewImage", (1680, 80), (300, 300), title="Steered", images=(img_steered, 0))
    both = g.add("ImageBatch", (1100, 720), (200, 46), image1=(img_plain, 0), image2=(img_steered, 0))
    check = g.add("SafeDIGSafetyCheck", (1340, 440), (300, 160), {"detector": "testbed", "threshold": 0.0},
                  images=(both, 0))
    g.add("PreviewAny", (1680, 440), (300, 200), title="Safety check (unsteered, steered)", source=(check, 0))
    fmap = g.add("SafeDIGFeatureMap", (760, 720), (300, 400), {**sampler},
                 model=(model, 0), dictionary=(select, 0), positive=(pos, 0), negative=(neg, 0),
                 latent_image=(latent, 0), vae=(model, 2))
    g.add("PreviewImage", (1340, 720), (640, 300), title="Where harmful latents fire (unsteered)",
          images=(fmap, 2))
    g.add("MarkdownNote", (-460, 80), (420, 620), {"text": TESTBED_NOTE})
    g.group("Testbed model and prompt", (-10, 0, 750, 490))
    g.group("SafeDIG safety steering", (-10, 500, 750, 350), "#3f8f5a")
    return g.workflow()


def build(info: dict) -> dict:
    g = Graph(info)
    model = g.add("SafeDIGTestbedModel", (0, 80), (300, 100))
    collect = g.add("SafeDIGCollectActivations", (340, 80), (380, 520),
                    {"prompt_file": "testbed_prompts.jsonl", "positions": "all", "steps": 12, "token_budget": 16,
                     "record_steps": "0,0.25,0.5,0.75", "output_name": "testbed_activations", "cfg": 3.0,
                     "width": 256, "height": 256}, model=(model, 0), clip=(model, 1))
    g.add("PreviewAny", (760, 80), (400, 200), title="Collected", source=(collect, 0))
    built = g.add("SafeDIGBuildDictionary", (340, 640), (380, 260),
                  {"store": "testbed_activations", "dictionary_name": "my_testbed_dictionary", "routed_positions": 3,
                   "train_steps": 300, "adapt_steps": 100, "expansion": 8, "k": 8, "batch_size": 512},
                  mode=2)
    g.add("PreviewAny", (760, 640), (400, 200), title="Built", mode=2, source=(built, 0))
    g.add("MarkdownNote", (-460, 80), (420, 520), {"text": BUILD_NOTE})
    return g.workflow()


MAKERS = {TESTBED: testbed, BUILD: build}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="safedig-workflows-") as base:
        server = start_server(os.path.join(base, "server"))
        try:
            info = server.object_info()
        finally:
            server.stop()
    for name, make in MAKERS.items():
        path = os.path.join(REPO, "workflows", f"{name}.json")
        text = json.dumps(make(info), indent=1, ensure_ascii=False) + "\n"  # made in full before the file is opened
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
