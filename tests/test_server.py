"""SafeDIG inside a real ComfyUI server: /object_info, API prompts through the real KSampler, errors.

The server (tests/server_fixture.py) runs ComfyUI's main.py on loopback with SafeDIG and a test-only
pack of tiny random FLUX/SD3 models; prompts end in ComfyUI's SaveLatent, whose files are compared.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.register_assert_rewrite("server_fixture")
from server_fixture import (  # noqa: E402 - after the assert-rewrite registration
    DICTIONARIES,
    FLUX_GOOD,
    FLUX_WIDTH32,
    SD3_GOOD,
    ComfyServer,
    combo_options,
    input_specs,
    input_type,
)

pytest_plugins = ("server_fixture",)
pytestmark = [pytest.mark.comfy, pytest.mark.server]

# What the SafeDIG nodes must show in /object_info: (name, type, options that must match exactly).
LOAD_INPUTS = [("dictionary_name", "COMBO", {})]
APPLY_INPUTS = [
    ("model", "MODEL", {}),
    ("dictionary", "SAFEDIG_DICTIONARY", {}),
    ("blend", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
    ("repel", "FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0}),
    ("threshold", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0}),
    ("start_percent", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0}),
    ("end_percent", "FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
    ("apply_to", "COMBO", {"default": "both"}),
    ("positions", "STRING", {"default": "all"}),
    ("preserve_norm", "BOOLEAN", {"default": False}),
    ("gate", "COMBO", {"default": "per token"}),
    ("detect_at", "COMBO", {"default": "each position"}),
    ("fast_gate", "BOOLEAN", {"default": False}),
    ("focus", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0}),
]
STEER = {"blend": 1.0, "repel": 1.0, "threshold": 0.0, "start_percent": 0.0, "end_percent": 1.0,
         "apply_to": "both", "positions": "all", "preserve_norm": False}
NO_STEER = {**STEER, "blend": 0.0, "repel": 0.0}


def prompt(prefix: str, family: str = "flux", steer: dict | None = None, dictionary: str = FLUX_GOOD) -> dict:
    """API-format prompt: tiny model [-> SafeDIG] -> KSampler (3 steps, real CFG) -> SaveLatent."""
    p = {
        "1": {"class_type": "SafeDIGTestTinyModel", "inputs": {"family": family, "seed": 0}},
        "2": {"class_type": "SafeDIGTestConditioning", "inputs": {"family": family, "seed": 1, "tokens": 8}},
        "3": {"class_type": "SafeDIGTestConditioning", "inputs": {"family": family, "seed": 2, "tokens": 8}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 3, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"safedig/{prefix}"}},
    }
    if steer is not None:
        p["5"] = {"class_type": "SafeDIGLoadDictionary", "inputs": {"dictionary_name": dictionary}}
        p["6"] = {"class_type": "SafeDIGApplySteering", "inputs": {"model": ["1", 0], "dictionary": ["5", 0], **steer}}
        p["7"]["inputs"]["model"] = ["6", 0]
    return p


def sample(server: ComfyServer, p: dict) -> torch.Tensor:
    """Run a prompt to completion and read back the latent its SaveLatent wrote."""
    entry = server.run(p)
    status = entry["status"]
    assert status["status_str"] == "success", f"prompt failed: {status['messages']}\n{server.log_tail()}"
    files = entry["outputs"]["8"]["latents"]
    assert len(files) == 1, files
    return load_file(server.output_path(files[0]))["latent_tensor"]


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


OPTIONAL = {"gate", "detect_at", "fast_gate", "focus"}  # added after workflows were saved: optional, so older API prompts still run


def check_inputs(info: dict, expected: list):
    specs = input_specs(info)
    assert list(specs) == [name for name, _, _ in expected], "input names or order differ"
    assert set(info["input"]) <= {"required", "optional"}, "no hidden inputs"
    assert set(info["input"].get("optional", {})) <= OPTIONAL, "only inputs added later are optional"
    for name, kind, opts in expected:
        spec = specs[name]
        assert input_type(spec) == kind, f"{name}: {spec}"
        extra = spec[1] if len(spec) > 1 else {}
        for key, want in opts.items():
            assert extra.get(key) == want, f"{name}.{key}: {extra.get(key)!r} != {want!r}"


def test_object_info_lists_the_safedig_nodes(comfy_server):
    info = comfy_server.object_info()
    assert {"SafeDIGLoadDictionary", "SafeDIGApplySteering"} <= set(info), comfy_server.log_tail()

    load = info["SafeDIGLoadDictionary"]
    check_inputs(load, LOAD_INPUTS)
    shipped = ["testbed_dictionary.safetensors"]  # the testbed's, in the pack (safedig_core/testbed/assets/sae)
    assert sorted(combo_options(load["input"]["required"]["dictionary_name"])) == sorted([*DICTIONARIES, *shipped])
    assert load["output"] == ["SAFEDIG_DICTIONARY"] and load["output_name"] == ["dictionary"]
    assert load["category"] == "SafeDIG" and load["python_module"] == "custom_nodes.SafeDIG"

    apply = info["SafeDIGApplySteering"]
    check_inputs(apply, APPLY_INPUTS)
    assert combo_options(apply["input"]["required"]["apply_to"]) == ["both", "cond", "uncond"]
    assert apply["output"] == ["MODEL"] and apply["category"] == "SafeDIG"
    assert not apply["output_node"] and not load["output_node"]


def test_steered_sampling_differs_and_zero_strength_is_identity(comfy_server):
    plain = sample(comfy_server, prompt("flux_plain"))
    steered = sample(comfy_server, prompt("flux_steered", steer=STEER))
    zero = sample(comfy_server, prompt("flux_zero", steer=NO_STEER))
    assert plain.shape == (1, 16, 8, 8) and torch.isfinite(plain).all() and torch.isfinite(steered).all()
    assert (steered - plain).abs().max() > 1e-3, "steering with firing harmful latents changed nothing"
    assert torch.equal(zero, plain), "blend = repel = 0 must reproduce the unsteered sampling bit for bit"


def test_sd3_steered_sampling_runs_and_differs(comfy_server):
    plain = sample(comfy_server, prompt("sd3_plain", family="sd3"))
    steered = sample(comfy_server, prompt("sd3_steered", family="sd3", steer=STEER, dictionary=SD3_GOOD))
    assert torch.isfinite(steered).all() and (steered - plain).abs().max() > 1e-3


def test_missing_dictionary_fails_clearly_and_the_server_keeps_serving(comfy_server):
    missing = "no_such_dictionary.safetensors"
    status, reply = comfy_server.submit(prompt("missing", steer=STEER, dictionary=missing))
    if status == 400:
        # A ComfyUI that checks V3 combo values at validation refuses the prompt up front.
        errors = reply["node_errors"]["5"]["errors"]
        assert [e["type"] for e in errors] == ["value_not_in_list"], errors
        assert missing in errors[0]["details"]
    else:
        # ComfyUI 0.3.75 checks only legacy list-typed combos (execution.validate_inputs), not V3 io.Combo
        # ones: the prompt is queued and SafeDIGLoadDictionary itself must fail with a clear message.
        assert status == 200, reply
        err = execution_error(comfy_server.wait(reply["prompt_id"]))
        assert err["node_type"] == "SafeDIGLoadDictionary" and err["exception_type"].endswith("PathRefused"), err
        assert missing in err["exception_message"] and "models/sae/" in err["exception_message"], err
        assert comfy_server.base_dir not in err["exception_message"], err  # nothing about the server's folders
    assert sample(comfy_server, prompt("after_missing", steer=STEER)).shape == (1, 16, 8, 8)


@pytest.mark.parametrize("dictionary, fragments", [
    (FLUX_WIDTH32, ["double.0.img", "width 32 in the dictionary", "64 in the model"]),
    (SD3_GOOD, ["made for SD3", "the model is FLUX"]),
], ids=["width_mismatch", "family_mismatch"])
def test_mismatched_dictionary_fails_clearly_and_the_server_keeps_serving(comfy_server, dictionary, fragments):
    entry = comfy_server.run(prompt(f"mismatch_{dictionary}", steer=STEER, dictionary=dictionary))
    err = execution_error(entry)
    assert err["node_type"] == "SafeDIGApplySteering" and err["exception_type"].endswith("DictionaryError"), err
    message = err["exception_message"]
    for fragment in [dictionary, *fragments]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sample(comfy_server, prompt(f"after_{dictionary}", steer=STEER)).shape == (1, 16, 8, 8)
