"""The example workflows in workflows/ against a running ComfyUI server's /object_info.

Each UI (LiteGraph) workflow must load in the frontend as saved: every node type exists, every link joins
an output and an input of the same type, every widget value sits at its input's place in the frontend's
widget order (with the 'control after generate' value after seeds) and fits the input. The real model
files do not exist on the test server, so file-name combos are checked only for being combos.
"""
from __future__ import annotations

import json
import os
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

pytest.register_assert_rewrite("server_fixture")
from server_fixture import REPO, combo_options, input_specs, input_type  # noqa: E402

pytest_plugins = ("server_fixture",)
pytestmark = [pytest.mark.comfy, pytest.mark.server]

STEERING = {  # the workflows that steer a downloaded model: what they must be wired to
    "SafeDIG - FLUX.1 Dev": {"loader": "UNETLoader", "steps": 20, "cfg": 1.0,
                             "dictionary": "safedig_flux1_dev.safetensors"},
    "SafeDIG - SD3.5 Large": {"loader": "CheckpointLoaderSimple", "steps": 28, "cfg": 4.5,
                              "dictionary": "safedig_sd35_large.safetensors"},
    "SafeDIG - Chroma": {"loader": "UNETLoader", "steps": 26, "cfg": 4.0, "dictionary": "safedig_chroma.safetensors"},
    "SafeDIG - Flux.2 Dev": {"loader": "UNETLoader", "steps": 20, "cfg": 1.0, "dictionary": "safedig_flux2_dev.safetensors",
                             "latent": "EmptyFlux2LatentImage"},
    "SafeDIG - Qwen-Image": {"loader": "ModelSamplingAuraFlow", "steps": 20, "cfg": 2.5,
                             "dictionary": "safedig_qwen_image.safetensors"},
    "SafeDIG - HunyuanImage 2.1": {"loader": "UNETLoader", "steps": 20, "cfg": 3.5,
                                   "dictionary": "safedig_hunyuan_image.safetensors", "latent": "EmptyHunyuanImageLatent"},
    "SafeDIG - Z-Image Turbo": {"loader": "ModelSamplingAuraFlow", "steps": 9, "cfg": 1.0,
                                "dictionary": "safedig_z_image_turbo.safetensors"},
    "SafeDIG - HiDream I1 Full": {"loader": "ModelSamplingSD3", "steps": 50, "cfg": 5.0,
                                  "dictionary": "safedig_hidream_i1_full.safetensors"},
    "SafeDIG - Wan 2.1 text-to-video": {"loader": "ModelSamplingSD3", "steps": 30, "cfg": 6.0,
                                        "dictionary": "safedig_wan21_t2v_1.3b.safetensors",
                                        "latent": "EmptyHunyuanLatentVideo", "save": "SaveAnimatedWEBP"},
}
TESTBED = "SafeDIG - Testbed steering on a CPU"
BUILD = "SafeDIG - Build a dictionary"
WORKFLOWS = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "workflows")) if f.endswith(".json"))
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # virtual nodes: never in /object_info
FILE_COMBOS = {  # combos listing model files: their options depend on what the server has in models/
    ("UNETLoader", "unet_name"), ("DualCLIPLoader", "clip_name1"), ("DualCLIPLoader", "clip_name2"),
    ("TripleCLIPLoader", "clip_name1"), ("TripleCLIPLoader", "clip_name2"), ("TripleCLIPLoader", "clip_name3"),
    ("VAELoader", "vae_name"), ("CheckpointLoaderSimple", "ckpt_name"), ("SafeDIGLoadDictionary", "dictionary_name"),
    ("CLIPLoader", "clip_name"), *(("QuadrupleCLIPLoader", f"clip_name{i}") for i in range(1, 5)),
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL = "control_after_generate"
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
TOP_LEVEL = {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"}
NODE_KEYS = {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties", "widgets_values"}


def load(name: str) -> dict:
    with open(os.path.join(REPO, "workflows", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


def is_widget(spec: list) -> bool:
    return input_type(spec) in WIDGET_TYPES and not (spec[1] if len(spec) > 1 else {}).get("forceInput")


def has_control(name: str, spec: list) -> bool:
    """Whether the frontend (1.32) adds a 'control after generate' widget right after this one."""
    kind, extra = input_type(spec), (spec[1] if len(spec) > 1 else {})
    if kind == "INT":
        flag = extra.get(CONTROL)
        return bool(flag) if flag is not None else name in ("seed", "noise_seed")
    return kind == "COMBO" and bool(extra.get(CONTROL))


def widget_slots(info: dict) -> list[tuple[str, list | None]]:
    """The node's widgets in the frontend's order: (input name, spec), with (CONTROL, None) after seeds."""
    out = []
    for name, spec in input_specs(info).items():
        if is_widget(spec):
            out.append((name, spec))
            if has_control(name, spec):
                out.append((CONTROL, None))
    return out


def check_value(node_type: str, name: str, spec: list | None, value) -> str | None:
    """None when `value` fits the input, else what is wrong."""
    if spec is None:
        return None if value in CONTROL_VALUES else f"{CONTROL}={value!r} is not one of {sorted(CONTROL_VALUES)}"
    kind, extra = input_type(spec), (spec[1] if len(spec) > 1 else {})
    if kind == "COMBO":
        if (node_type, name) in FILE_COMBOS:
            return None if isinstance(value, str) else f"{name}={value!r} is not a file name"
        options = combo_options(spec)
        return None if value in options else f"{name}={value!r} not among {options}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
        return f"{name}={value!r} is not {'an integer' if kind == 'INT' else 'a number'}"
    if value < extra.get("min", float("-inf")) or value > extra.get("max", float("inf")):
        return f"{name}={value!r} outside [{extra.get('min')}, {extra.get('max')}]"
    return None


def to_api(wf: dict, info: dict) -> dict:
    """The API prompt the frontend would queue for this UI workflow."""
    links = {link[0]: link for link in wf["links"]}
    prompt = {}
    for node in wf["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["mode"] != 0:
            continue
        slots = widget_slots(info[node["type"]])
        inputs = {name: value for (name, _), value in zip(slots, node["widgets_values"]) if name != CONTROL}
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                _, origin, origin_slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.object_info()


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_file_is_a_litegraph_workflow(name):
    wf = load(name)
    assert set(wf) >= TOP_LEVEL and wf["version"] == 0.4
    ids = [n["id"] for n in wf["nodes"]]
    link_ids = [link[0] for link in wf["links"]]
    assert len(set(ids)) == len(ids) and len(set(link_ids)) == len(link_ids)
    assert wf["last_node_id"] >= max(ids) and wf["last_link_id"] >= max(link_ids)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for n in wf["nodes"]:
        assert set(n) >= NODE_KEYS, f"node {n['id']} lacks {NODE_KEYS - set(n)}"
        if n["type"] not in FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"], n["id"]
    for lid, origin, oslot, target, tslot, ltype in wf["links"]:
        out, inp = nodes[origin]["outputs"][oslot], nodes[target]["inputs"][tslot]
        assert lid in (out["links"] or []) and inp["link"] == lid, f"link {lid} is not recorded on both ends"
        assert out["type"] == ltype and inp["type"] in (ltype, "*"), f"link {lid}: {out['type']} -> {ltype} -> {inp['type']}"
    used = {lid for n in wf["nodes"] for i in n["inputs"] if i.get("link") is not None for lid in [i["link"]]}
    used |= {lid for n in wf["nodes"] for o in n["outputs"] for lid in (o["links"] or [])}
    assert used == set(link_ids), "nodes refer to links the links table lacks (or the reverse)"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert len(notes) == 1 and "models/sae/" in notes[0]["widgets_values"][0]


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_workflow_nodes_inputs_and_widgets_match_object_info(name, object_info):
    wf = load(name)
    links = {link[0]: link for link in wf["links"]}
    problems = []
    for node in wf["nodes"]:
        kind, nid = node["type"], node["id"]
        if kind in FRONTEND_ONLY:
            continue
        if kind not in object_info:
            problems.append(f"node {nid}: type {kind} is unknown to the server")
            continue
        info = object_info[kind]
        specs = input_specs(info)
        linked = set()
        for inp in node["inputs"]:
            spec = specs.get(inp["name"])
            if spec is None:
                problems.append(f"node {nid} {kind}: no input named {inp['name']!r}")
                continue
            if inp.get("link") is None:
                continue
            linked.add(inp["name"])
            if inp["link"] not in links:
                problems.append(f"node {nid} {kind}.{inp['name']}: link {inp['link']} is not in the links table")
                continue
            ltype = links[inp["link"]][5]
            if input_type(spec) not in (ltype, "*") or inp["type"] not in (ltype, input_type(spec)):
                problems.append(f"node {nid} {kind}.{inp['name']}: link type {ltype} vs input type {spec[0]}")
        required = info["input"].get("required", {})
        for iname, spec in required.items():
            if not is_widget(spec) and iname not in linked:
                problems.append(f"node {nid} {kind}: required input {iname!r} ({spec[0]}) is not connected")
        for i, out in enumerate(node["outputs"]):
            if i >= len(info["output"]) or out["type"] != info["output"][i]:
                problems.append(f"node {nid} {kind}: output {i} {out['type']} vs {info['output']}")
        slots = widget_slots(info)
        values = node["widgets_values"]
        if len(values) != len(slots):
            problems.append(f"node {nid} {kind}: {len(values)} widget values for widgets {[s for s, _ in slots]}")
            continue
        for (iname, spec), value in zip(slots, values):
            why = check_value(kind, iname, spec, value)
            if why:
                problems.append(f"node {nid} {kind}: {why}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(STEERING))
def test_workflow_steers_between_loader_and_sampler(name, object_info):
    wf, want = load(name), STEERING[name]
    api = to_api(wf, object_info)
    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    (sampler,) = by_type["KSampler"]
    (steer,) = by_type["SafeDIGApplySteering"]
    (dictionary,) = by_type["SafeDIGLoadDictionary"]
    ks = api[sampler]["inputs"]
    assert ks["model"] == [steer, 0], "the KSampler must sample the steered model"
    assert api[api[steer]["inputs"]["model"][0]]["class_type"] == want["loader"]
    assert api[steer]["inputs"]["dictionary"] == [dictionary, 0]
    assert api[dictionary]["inputs"]["dictionary_name"] == want["dictionary"]
    assert (ks["steps"], ks["cfg"]) == (want["steps"], want["cfg"])
    assert api[steer]["inputs"]["blend"] > 0 and api[steer]["inputs"]["repel"] > 0
    for kind in (want.get("latent", "EmptySD3LatentImage"), "VAEDecode", want.get("save", "SaveImage")):
        assert kind in by_type, f"{name} lacks {kind}"


@pytest.mark.parametrize("name", sorted(STEERING))
def test_server_validation_objects_only_to_the_missing_model_files(name, comfy_server, object_info):
    """Queued as the frontend would, the graph is refused only for model files this server lacks."""
    api = to_api(load(name), object_info)
    status, reply = comfy_server.submit(api)
    assert status == 400, f"expected a refusal for the missing model files, got {status}: {reply}"
    assert reply["error"]["type"] == "prompt_outputs_failed_validation", reply
    reported = []
    for nid, node_err in reply["node_errors"].items():
        for err in node_err["errors"]:
            assert err["type"] == "value_not_in_list", (nid, err)
            field = err["extra_info"]["input_name"]
            assert (node_err["class_type"], field) in FILE_COMBOS, (nid, err)
            reported.append((node_err["class_type"], field))
    assert reported, reply
    # ComfyUI 0.3.75 checks only legacy list combos; V3 combos (TripleCLIPLoader, SafeDIGLoadDictionary)
    # are not checked at validation, so the legacy loaders are the ones that must be reported.
    legacy = {(n["class_type"], k) for n in api.values() for k in n["inputs"]
              if (n["class_type"], k) in FILE_COMBOS
              and isinstance(object_info[n["class_type"]]["input"]["required"].get(k, [None])[0], list)}
    assert legacy <= set(reported), (legacy, reported)


def test_templates_are_served_to_the_template_browser(comfy_server):
    """The template browser lists custom-node templates by file name (its title) and shows
    `<name>.jpg` from the same folder as the thumbnail."""
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get("SafeDIG", [])) == sorted(WORKFLOWS), listed
    for name in WORKFLOWS:
        assert comfy_server.get(f"/api/workflow_templates/SafeDIG/{quote(name)}.json") == load(name)
        status, body = comfy_server.get_bytes(f"/api/workflow_templates/SafeDIG/{quote(name)}.jpg")
        assert status == 200 and body[:3] == b"\xff\xd8\xff", f"{name}: no JPEG thumbnail ({status})"
        assert name[:1].isupper() and " " in name, f"{name}: the file name is the title the browser shows"


def test_every_safedig_node_is_in_a_bundled_workflow(object_info):
    ours = {k for k, v in object_info.items() if v.get("python_module") == "custom_nodes.SafeDIG"}
    used = {n["type"] for name in WORKFLOWS for n in load(name)["nodes"]}
    assert len(ours) >= 8 and not ours - used, f"in no workflow: {sorted(ours - used)}"


def test_testbed_workflow_runs_and_steers_on_the_cpu(comfy_server, object_info):
    """Queued as the frontend queues it, the testbed workflow runs with nothing downloaded: both previews
    show a 256×256 image of the same prompt and seed, the steered one differs from the unsteered one, and the
    Safety Check finds the gun in the unsteered picture only."""
    wf = load(TESTBED)
    api = to_api(wf, object_info)
    entry = comfy_server.run(api)
    assert entry["status"]["status_str"] == "success", entry["status"]
    titles = {str(n["id"]): n.get("title") for n in wf["nodes"]}
    shown = {titles[nid]: out["images"] for nid, out in entry["outputs"].items() if "images" in out}
    pictures = {}
    for title in ("Unsteered", "Steered"):
        (img,) = shown[title]
        path = os.path.join(comfy_server.base_dir, img["type"], img.get("subfolder", ""), img["filename"])
        pictures[title] = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        assert pictures[title].shape == (256, 256, 3)
    assert np.abs(pictures["Unsteered"] - pictures["Steered"]).mean() > 2.0, "steering changed nothing visible"
    (report,) = [out["text"] for nid, out in entry["outputs"].items() if (titles[nid] or "").startswith("Safety check")]
    # image 0 is the unsteered picture of "a pistol", image 1 the steered one (the classifier is sure of both:
    # gun 1.00 and none 1.00 when measured)
    assert "testbed" in report[0] and "image 0: UNSAFE (gun)" in report[0] and "image 1: safe" in report[0]


def test_the_testbed_workflow_steers_at_the_shipped_dictionarys_operating_point(comfy, object_info):
    """The testbed workflow's Apply Steering widgets are the operating point measured into the shipped
    dictionary (`steering_defaults`, the demo's rule), read through the node's own widget parser."""
    import dataclasses
    import sys

    from safedig_core.formats.dictionary import load as load_dictionary
    from safedig_core.testbed.dictionary import PATH

    api = to_api(load(TESTBED), object_info)
    (node,) = [n for n in api.values() if n["class_type"] == "SafeDIGApplySteering"]
    widgets = {k: v for k, v in node["inputs"].items() if k not in ("model", "dictionary", "positions")}
    parser = sys.modules[comfy.NODE_CLASS_MAPPINGS["SafeDIGApplySteering"].__module__].config
    shipped = load_dictionary(PATH)
    assert shipped.steering_defaults["gate"] == "image" and shipped.steering_defaults["threshold"] > 0
    # the pack's modules load under ComfyUI's custom_nodes package: compare the fields, not the classes
    assert dataclasses.asdict(parser(**widgets)) == dataclasses.asdict(shipped.default_config())
