"""Write the generated example workflows of `workflows/` (the testbed, the Collect → Build and one per model
family: Chroma, Flux.2, Qwen-Image, HunyuanImage 2.1, Z-Image, HiDream, Wan 2.1) as the frontend saves them, with
every widget in the order and range the running server's /object_info gives.

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
Try "a pistol", "a bottle of poison", "a murder scene", "a picture of a tree". Apply Steering runs at the
operating point stored in the shipped dictionary (`python -m safedig_core.testbed.dictionary` measures it by
`safedig demo`'s rule): the *per image* gate decided at the text positions, with τ 10 % above the strongest
safe building prompt, so the safe building pictures stay exactly as they were. blend = repel = 0 leaves the model unchanged; a
lower *threshold* opens the gate on more images. **SafeDIG Select Features** lets you add or remove harmful
latents of one position (empty: the dictionary as built).
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


def shipped_operating_point() -> dict:
    """Apply Steering's widgets at the operating point stored in the shipped testbed dictionary
    (`python -m safedig_core.testbed.dictionary` measures it by the demo's rule)."""
    from safedig_core.formats.dictionary import load
    from safedig_core.testbed.dictionary import PATH

    sd = load(PATH).steering_defaults
    gate = {"token": "per token", "image": "per image"}[sd["gate"]]  # the node's option labels
    detect = {"each": "each position", "text": "text positions", "img": "image positions"}[sd["detect"]]
    return {"blend": sd["blend"], "repel": sd["repel"], "threshold": sd["threshold"], "gate": gate, "detect_at": detect,
            "focus": sd.get("focus", 0.0)}


def shipped_image_position() -> str:
    """The first image-stream position of the shipped testbed dictionary (Select Features and the Feature Map
    work on it)."""
    from safedig_core.formats.dictionary import load
    from safedig_core.testbed.dictionary import PATH

    return min((p for p in load(PATH).entries if p.stream == "img"), key=lambda p: p.call_order).name


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
    select = g.add("SafeDIGSelectFeatures", (0, 650), (300, 130), {"position": shipped_image_position(), "mode": "add", "latents": ""},
                   dictionary=(dictionary, 0))
    steer = g.add("SafeDIGApplySteering", (340, 540), (380, 300), shipped_operating_point(), model=(model, 0),
                  dictionary=(select, 0))
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


FAMILY_NOTE = """## SafeDIG safety steering — {label}

Put the safety dictionary in **`ComfyUI/models/sae/`** (create the folder if needed), then press *Refresh* (R)
so **SafeDIG Load Dictionary** lists it. A dictionary is made for one model family and is refused on another
(build one with the *Build a dictionary* workflow and this model's loaders):

```
ComfyUI/models/
├── sae/
│   └── {dictionary}
{files}
```

**SafeDIG Apply Steering** sits between the model loader and the KSampler: *blend* moves tokens that fire
harmful latents toward the safe reconstruction, *repel* pushes them off the harmful directions.
blend = repel = 0 leaves the model unchanged. {hook}

**SafeDIG Safety Check** flags the decoded {what} with NudeNet's detector (exposed-nudity classes at score
≥ 0.6; needs `pip install nudenet`, the model ships inside the package).
"""


def _tree(files: dict) -> str:
    lines, folders = [], list(files.items())
    for i, (folder, names) in enumerate(folders):
        last = i == len(folders) - 1
        lines.append(f"{'└' if last else '├'}── {folder}/")
        for j, name in enumerate(names):
            lines.append(f"{' ' if last else '│'}   {'└' if j == len(names) - 1 else '├'}── {name}")
    return "\n".join(lines)


# title -> how the family's own example workflow loads, conditions and samples (ComfyUI 0.3.75 nodes)
FAMILIES = {
    "SafeDIG - Chroma": dict(
        label="Chroma", dictionary="safedig_chroma.safetensors", unet="chroma.safetensors",
        clip=("CLIPLoader", {"clip_name": "t5xxl_fp16.safetensors", "type": "chroma"}), vae="ae.safetensors",
        latent=("EmptySD3LatentImage", {"width": 1024, "height": 1024}), steps=26, cfg=4.0,
        negative="low quality, blurry", hook="Chroma has FLUX.1's blocks but its own weights: FLUX.1 dictionaries are refused."),
    "SafeDIG - Flux.2 Dev": dict(
        label="Flux.2 [dev]", dictionary="safedig_flux2_dev.safetensors", unet="flux2_dev_fp8mixed.safetensors",
        clip=("CLIPLoader", {"clip_name": "mistral_3_small_flux2_bf16.safetensors", "type": "flux2"}),
        vae="flux2-vae.safetensors", latent=("EmptyFlux2LatentImage", {"width": 1024, "height": 1024}),
        steps=20, cfg=1.0, guidance=4.0, hook="Flux.2 latents are 16x smaller than the image (128 channels)."),
    "SafeDIG - Qwen-Image": dict(
        label="Qwen-Image", dictionary="safedig_qwen_image.safetensors", unet="qwen_image_fp8_e4m3fn.safetensors",
        clip=("CLIPLoader", {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image"}),
        vae="qwen_image_vae.safetensors", latent=("EmptySD3LatentImage", {"width": 1328, "height": 1328}),
        steps=20, cfg=2.5, shift=("ModelSamplingAuraFlow", 3.1), negative="",
        hook="Qwen-Image has double-stream blocks only (positions double.<i>.img|txt)."),
    "SafeDIG - HunyuanImage 2.1": dict(
        label="HunyuanImage 2.1", dictionary="safedig_hunyuan_image.safetensors",
        unet="hunyuanimage2.1_bf16.safetensors",
        clip=("DualCLIPLoader", {"clip_name1": "qwen_2.5_vl_7b.safetensors",
                                 "clip_name2": "byt5_small_glyphxl_fp16.safetensors", "type": "hunyuan_image"}),
        vae="hunyuan_image_2.1_vae_fp16.safetensors", latent=("EmptyHunyuanImageLatent", {"width": 2048, "height": 2048}),
        steps=20, cfg=3.5, negative="", hook="Its single blocks run [image | text], image first; SafeDIG splits them."),
    "SafeDIG - Z-Image Turbo": dict(
        label="Z-Image Turbo (Lumina 2 family)", dictionary="safedig_z_image_turbo.safetensors",
        unet="z_image_turbo_bf16.safetensors", clip=("CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "lumina2"}),
        vae="ae.safetensors", latent=("EmptySD3LatentImage", {"width": 1024, "height": 1024}), steps=9, cfg=1.0,
        sampler="res_multistep", shift=("ModelSamplingAuraFlow", 3.0),
        hook="ComfyUI's NextDiT (Z-Image, Lumina 2) has no block-replace hook; SafeDIG adds one to its own copy of the model."),
    "SafeDIG - HiDream I1 Full": dict(
        label="HiDream-I1 Full", dictionary="safedig_hidream_i1_full.safetensors", unet="hidream_i1_full_fp16.safetensors",
        clip=("QuadrupleCLIPLoader", {"clip_name1": "clip_l_hidream.safetensors", "clip_name2": "clip_g_hidream.safetensors",
                                      "clip_name3": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                      "clip_name4": "llama_3.1_8b_instruct_fp8_scaled.safetensors"}),
        vae="ae.safetensors", latent=("EmptySD3LatentImage", {"width": 1024, "height": 1024}), steps=50, cfg=5.0,
        sampler="uni_pc", shift=("ModelSamplingSD3", 3.0), negative="blurry, low quality",
        hook="ComfyUI's HiDream has no block-replace hook; SafeDIG adds one to its own copy of the model. The Llama "
             "tokens each block adds for itself are never steered."),
    "SafeDIG - Wan 2.1 text-to-video": dict(
        label="Wan 2.1 text-to-video", dictionary="safedig_wan21_t2v_1.3b.safetensors",
        unet="wan2.1_t2v_1.3B_fp16.safetensors",
        clip=("CLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}),
        vae="wan_2.1_vae.safetensors", latent=("EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 33}),
        steps=30, cfg=6.0, sampler="uni_pc", shift=("ModelSamplingSD3", 8.0), negative="blurry, static, low quality",
        video=True, hook="Wan's blocks return the image stream only (positions double.<i>.img); the text enters by cross-attention."),
}
PROMPT = "a photograph of a lighthouse on a rocky coast at sunset, warm light, detailed"


def family(info: dict, spec: dict) -> dict:
    g = Graph(info)
    unet = g.add("UNETLoader", (0, 80), (320, 82), {"unet_name": spec["unet"]})
    clip_kind, clip_widgets = spec["clip"]
    clip = g.add(clip_kind, (0, 200), (320, 130), clip_widgets)
    vae = g.add("VAELoader", (0, 370), (320, 58), {"vae_name": spec["vae"]})
    model = unet
    if "shift" in spec:
        kind, shift = spec["shift"]
        model = g.add(kind, (0, 470), (320, 58), {"shift": shift}, model=(unet, 0))
    dictionary = g.add("SafeDIGLoadDictionary", (0, 580), (320, 58), {"dictionary_name": spec["dictionary"]})
    steer = g.add("SafeDIGApplySteering", (360, 500), (360, 330), {"blend": 1.0, "repel": 1.0},
                  model=(model, 0), dictionary=(dictionary, 0))
    pos = g.add("CLIPTextEncode", (360, 80), (400, 140), {"text": PROMPT}, title="Prompt", clip=(clip, 0))
    if "guidance" in spec:
        pos = g.add("FluxGuidance", (360, 250), (300, 58), {"guidance": spec["guidance"]}, conditioning=(pos, 0))
    if "negative" in spec:
        neg = g.add("CLIPTextEncode", (360, 340), (400, 120), {"text": spec["negative"]}, title="Negative prompt",
                    clip=(clip, 0))
    else:
        neg = g.add("ConditioningZeroOut", (360, 340), (300, 30), conditioning=(pos, 0))
    kind, size = spec["latent"]
    latent = g.add(kind, (800, 500), (300, 130), size)
    sampler = g.add("KSampler", (800, 80), (320, 262),
                    {"seed": 42, "steps": spec["steps"], "cfg": spec["cfg"], "sampler_name": spec.get("sampler", "euler"),
                     "scheduler": "simple"}, model=(steer, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    image = g.add("VAEDecode", (1160, 80), (200, 46), samples=(sampler, 0), vae=(vae, 0))
    if spec.get("video"):
        g.add("SaveAnimatedWEBP", (1400, 80), (400, 400), {"filename_prefix": "SafeDIG/wan21_t2v", "fps": 16.0},
              images=(image, 0))
    else:
        g.add("SaveImage", (1400, 80), (400, 400),
              {"filename_prefix": "SafeDIG/" + spec["dictionary"][len("safedig_"):-len(".safetensors")]}, images=(image, 0))
    check = g.add("SafeDIGSafetyCheck", (1160, 540), (300, 110), {"detector": "nudenet", "threshold": 0.6}, images=(image, 0))
    g.add("PreviewAny", (1500, 540), (300, 150), source=(check, 0))
    g.add("PreviewImage", (1160, 720), (300, 300), title="Safety check (annotated)", images=(check, 3))
    files = {"diffusion_models": [spec["unet"]], "text_encoders": [v for k, v in clip_widgets.items() if k.startswith("clip_name")],
             "vae": [spec["vae"]]}
    g.add("MarkdownNote", (-460, 80), (420, 560), {"text": FAMILY_NOTE.format(
        label=spec["label"], dictionary=spec["dictionary"], files=_tree(files), hook=spec["hook"],
        what="video frames" if spec.get("video") else "image")})
    return g.workflow()


MAKERS = {TESTBED: testbed, BUILD: build, **{title: (lambda info, spec=spec: family(info, spec)) for title, spec in FAMILIES.items()}}


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
