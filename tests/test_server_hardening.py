"""A real ComfyUI server probed as an outside user would probe it, over HTTP on loopback: no file outside
ComfyUI's folders is read or echoed, Collect Activations → Build Dictionary → steering works end to end,
many queued mixed prompts rerun bit for bit with no hook leaking into later prompts, and a server killed
mid-collection resumes to the same store."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

pytest.register_assert_rewrite("server_fixture")
from server_fixture import FLUX_GOOD, FLUX_WIDTH32, ComfyServer, _free_port  # noqa: E402
from test_server import NO_STEER, STEER, prompt, sample  # noqa: E402

pytest_plugins = ("server_fixture",)
pytestmark = [pytest.mark.comfy, pytest.mark.server]

SECRET = "TOPSECRET-first-line"
CATEGORIES = ("violence", "fire", "weapons")


def prompt_rows(n_safe=6, per_category=3) -> str:
    rows = ["prompt,label,category,domain"]
    rows += [f"a calm lake {i},safe,,source" for i in range(n_safe)]
    rows += [f"{c} scene {i},unsafe,{c},source" for c in CATEGORIES for i in range(per_category)]
    rows += [f"poison bottle {i},unsafe,poison,target" for i in range(3)]
    rows += [f"quiet meadow {i},safe,,target" for i in range(2)]
    return "\n".join(rows) + "\n"


def collect_prompt(prompt_file: str, output_name: str, steps: int = 3) -> dict:
    return {
        "1": {"class_type": "SafeDIGTestTinyModel", "inputs": {"family": "flux", "seed": 0}},
        "2": {"class_type": "SafeDIGTestClip", "inputs": {"family": "flux"}},
        "3": {"class_type": "SafeDIGCollectActivations", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "prompt_file": prompt_file, "positions": "double.0.img,single.1.img",
            "steps": steps, "seed": 0, "token_budget": 8, "record_steps": "all", "output_name": output_name,
            "cfg": 2.0, "guidance": 3.5, "sampler_name": "euler", "scheduler": "simple", "width": 64, "height": 64,
            "negative_prompt": "", "dtype": "float16"}},
    }


def build_prompt(store: str, name: str, overwrite: bool = False, seed: int = 0) -> dict:
    return {"1": {"class_type": "SafeDIGBuildDictionary", "inputs": {
        "store": store, "dictionary_name": name, "routed_positions": 1, "train_steps": 30, "adapt_steps": 10,
        "expansion": 2, "k": 4, "batch_size": 64, "seed": seed, "overwrite": overwrite}}}


def error_of(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def text_of(entry: dict, node: str) -> str:
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    return "".join(entry["outputs"][node]["text"])


@pytest.fixture(scope="module")
def secret(comfy_server) -> str:
    """A file outside ComfyUI's folders that parses as a prompt set, and a symlink to it from input/."""
    path = os.path.join(comfy_server.base_dir, "secret.csv")
    with open(path, "w") as f:
        f.write(f"prompt,label,category\n{SECRET},safe,\n")
    os.symlink(path, os.path.join(comfy_server.base_dir, "input", "link.csv"))
    return path


def test_no_file_outside_the_input_folder_is_read_or_revealed(comfy_server, secret):
    base = comfy_server.base_dir
    tries = [secret, "../secret.csv", "link.csv", "sub/../../secret.csv", "/etc/passwd", "/no/such/file.csv",
             "missing.csv", "..\\secret.csv", "~/secret.csv"]
    messages = {}
    for i, name in enumerate(tries):
        err = error_of(comfy_server.run(collect_prompt(name, f"probe{i}")))
        msg = err["exception_message"].replace(repr(name), "NAME")  # what the user typed may come back
        assert SECRET not in msg and base not in msg and "root:" not in msg, msg
        assert "\n" not in msg.strip(), msg
        messages[name] = msg
        status, _ = comfy_server.request("GET", f"/view?type=output&subfolder=safedig_activations/probe{i}"
                                                "&filename=prompts.jsonl")
        assert status == 404, f"{name}: a store was made and served"
    # whether a path exists, or leads out through a symlink, is not told apart
    assert len({messages[n] for n in (secret, "link.csv", "/no/such/file.csv", "missing.csv", "../secret.csv")}) == 1


def test_cell_values_are_not_echoed(comfy_server):
    with open(os.path.join(comfy_server.base_dir, "input", "cells.csv"), "w") as f:
        f.write("prompt,label,category\nhello,SECRET-LABEL,\n")
    msg = error_of(comfy_server.run(collect_prompt("cells.csv", "cells")))["exception_message"]
    assert "line 2: label: expected 'safe' or 'unsafe'" in msg and "SECRET" not in msg, msg


def test_dictionary_and_store_names_stay_in_their_folders(comfy_server, secret):
    for name in ("../../secret.csv", secret, "../" + FLUX_GOOD):
        p = prompt("x", steer=STEER, dictionary=name)
        status, reply = comfy_server.submit(p)
        if status == 200:
            msg = error_of(comfy_server.wait(reply["prompt_id"]))["exception_message"].replace(repr(name), "NAME")
            assert "is not in models/sae/" in msg and comfy_server.base_dir not in msg, msg
    for store in (os.path.join(comfy_server.base_dir, "output"), "../../output", "/tmp"):
        msg = error_of(comfy_server.run(build_prompt(store, "nope")))["exception_message"].replace(repr(store), "NAME")
        assert "store" in msg and comfy_server.base_dir not in msg, msg
    assert not os.path.exists(os.path.join(comfy_server.base_dir, "models", "sae", "nope.safetensors"))


def test_collect_build_and_steer_on_the_server(comfy_server):
    with open(os.path.join(comfy_server.base_dir, "input", "build.csv"), "w") as f:
        f.write(prompt_rows(n_safe=4, per_category=2))
    text = text_of(comfy_server.run(collect_prompt("build.csv", "srv/run")), "3")
    assert "complete" in text and comfy_server.base_dir not in text
    text = text_of(comfy_server.wait(comfy_server.queue(build_prompt("srv/run", "srv_built")), timeout=120), "1")
    assert "routed:" in text and "output/safedig_builds/srv_built.work" in text
    again = comfy_server.run(build_prompt("srv/run", "srv_built", seed=1))  # (the same graph would be cached)
    assert "already exists; ask to overwrite" in error_of(again)["exception_message"]
    sae_dir = os.path.join(comfy_server.base_dir, "models", "sae")
    assert "srv_built.safetensors" in os.listdir(sae_dir) and not any(n.endswith(".work") for n in os.listdir(sae_dir))
    info = comfy_server.get("/object_info/SafeDIGLoadDictionary")["SafeDIGLoadDictionary"]
    spec = info["input"]["required"]["dictionary_name"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert "srv_built.safetensors" in options and not any("ckpt" in o or ".work" in o for o in options)
    plain = sample(comfy_server, prompt("built_plain"))
    steered = sample(comfy_server, prompt("built_steered", steer=STEER, dictionary="srv_built.safetensors"))
    assert torch.isfinite(steered).all() and plain.shape == steered.shape


def seeded(prefix: str, seed: int, **kw) -> dict:
    p = prompt(prefix, **kw)
    p["7"]["inputs"]["seed"] = seed
    return p


def test_many_queued_mixed_prompts_rerun_bit_for_bit(comfy_server):
    """30 prompts queued at once: plain, steered, identity (blend = repel = 0) and invalid ones, mixed; then,
    with ComfyUI's caches freed, every valid one again in another order: the same bits, identity equal to
    plain, and no steering leaking into a plain prompt that follows a steered one on the cached model."""
    kinds = {"plain": {}, "steered": {"steer": STEER}, "zero": {"steer": NO_STEER}}
    jobs = [(kind, seed) for seed in range(100, 108) for kind in kinds]
    random.Random(0).shuffle(jobs)
    queued = []
    for i, (kind, seed) in enumerate(jobs):
        queued.append(((kind, seed), comfy_server.queue(seeded(f"load/{kind}_{seed}_a", seed, **kinds[kind]))))
        if i % 4 == 3:  # an invalid prompt every few: a dictionary of the wrong width
            queued.append((None, comfy_server.queue(seeded("load/bad", seed, steer=STEER, dictionary=FLUX_WIDTH32))))

    first = {}
    for job, pid in queued:
        entry = comfy_server.wait(pid)
        if job is None:
            assert "width 32 in the dictionary" in error_of(entry)["exception_message"]
            continue
        assert entry["status"]["status_str"] == "success", entry["status"]
        f = entry["outputs"]["8"]["latents"][0]
        first[job] = load_file(comfy_server.output_path(f))["latent_tensor"]
    assert len(first) == len(jobs) >= 24
    for seed in range(100, 108):
        assert torch.equal(first[("zero", seed)], first[("plain", seed)])
        assert not torch.equal(first[("steered", seed)], first[("plain", seed)])
    status, _ = comfy_server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    random.Random(1).shuffle(jobs)
    for kind, seed in jobs:
        again = sample(comfy_server, seeded(f"load/{kind}_{seed}_b", seed, **kinds[kind]))
        assert torch.equal(again, first[(kind, seed)]), f"{kind} seed {seed} changed on rerun"


def _restart(server: ComfyServer) -> ComfyServer:
    port = _free_port()
    argv = list(server.argv)
    argv[argv.index("--port") + 1] = str(port)
    log = open(server.log_path, "ab")
    proc = subprocess.Popen(argv, cwd=_comfy_dir(), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
    new = ComfyServer(proc, port, server.base_dir, server.log_path, argv)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new.alive()
        try:
            if new.request("GET", "/system_stats", timeout=2.0)[0] == 200:
                return new
        except OSError:
            pass
        time.sleep(0.2)
    new.stop()
    raise AssertionError("the restarted server did not answer\n" + new.log_tail())


def _comfy_dir() -> str:
    from safedig_core.adapters.comfy.runtime import comfyui_path

    return comfyui_path()


def _manifest(server, name) -> dict:
    with open(os.path.join(server.base_dir, "output", "safedig_activations", name, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_server_killed_mid_collection_resumes_to_the_same_store(tmp_path_factory, monkeypatch):
    from server_fixture import start_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: threads only fight over the cores
    server = start_server(str(tmp_path_factory.mktemp("kill_server")))
    try:
        with open(os.path.join(server.base_dir, "input", "many.csv"), "w") as f:
            f.write(prompt_rows(n_safe=12, per_category=3))
        server.queue(collect_prompt("many.csv", "killed", steps=4))
        folder = os.path.join(server.base_dir, "output", "safedig_activations", "killed")
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(folder, "manifest.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.killpg(server.proc.pid, signal.SIGKILL)  # mid-collection: the whole server, at once
        server.proc.wait(timeout=15)
        assert not _manifest(server, "killed")["complete"], "the collection finished before the kill"
        server = _restart(server)
        entry = server.wait(server.queue(collect_prompt("many.csv", "killed", steps=4)), timeout=120)
        text = text_of(entry, "3")
        assert "complete" in text
        fresh = server.wait(server.queue(collect_prompt("many.csv", "fresh", steps=4)), timeout=120)
        assert "complete" in text_of(fresh, "3")
        a, b = _manifest(server, "killed"), _manifest(server, "fresh")
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and a["complete"]
    finally:
        server.stop()
