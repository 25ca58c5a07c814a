"""A real ComfyUI server (main.py, loopback only) with SafeDIG and the test-only node pack installed.

Test modules load this file with `pytest_plugins = ("server_fixture",)`, which registers the fixture
once for the whole session: one server start serves both test_server.py and test_workflows.py.

Layout of the server's `--base-directory` (a temp folder; the ComfyUI tree is never written to):
    custom_nodes/SafeDIG            -> symlink to this repository (the node pack under test)
    custom_nodes/safedig_test_nodes -> symlink to tests/server_pack/safedig_test_nodes (tiny models)
    models/sae/*.safetensors        -> dictionaries written with safedig_core.formats.dictionary.save
    output/, user/, temp/, input/   -> the server's own
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from safedig_core.formats.dictionary import DictionaryEntry, SafetyDictionary, save  # noqa: E402
from safedig_core.positions import parse  # noqa: E402
from safedig_core.sae import SparseAutoencoder  # noqa: E402

TEST_PACK = os.path.join(REPO, "tests", "server_pack", "safedig_test_nodes")
STARTUP_TIMEOUT_S = 120.0
PROMPT_TIMEOUT_S = 60.0

# The dictionaries in the server's models/sae/ (tiny FLUX: width 64, 2 double + 2 single blocks;
# tiny SD3: width 128, 2 joint blocks, the last context-pre-only).
FLUX_GOOD = "tiny_flux_good.safetensors"
FLUX_WIDTH32 = "tiny_flux_width32.safetensors"
SD3_GOOD = "tiny_sd3_good.safetensors"
DICTIONARIES = {
    FLUX_GOOD: ("flux", 64, ["double.0.img", "single.1.img"]),
    FLUX_WIDTH32: ("flux", 32, ["double.0.img", "single.1.img"]),
    SD3_GOOD: ("sd3", 128, ["joint.0.img", "joint.0.txt"]),
}
HARMFUL = 6  # latents 0..5 of every position: a large positive encoder bias makes them fire on every token


def make_dictionary(family: str, width: int, positions: list[str], latents: int = 64, k: int = 8,
                    seed: int = 0) -> SafetyDictionary:
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name in positions:
        p = parse(name)
        sae = SparseAutoencoder.init_random(width, latents, k, generator=g)
        with torch.no_grad():
            sae.b_enc[:HARMFUL] = 50.0
        entries[p] = DictionaryEntry(p, sae, list(range(HARMFUL)), [1.0 - 0.1 * i for i in range(HARMFUL)])
    return SafetyDictionary(family, entries, {"blend": 1.0, "repel": 1.0}, {"made_by": "tests/server_fixture.py"})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Direct connections only: an http_proxy in the environment must never see the loopback traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServer:
    def __init__(self, proc: subprocess.Popen, port: int, base_dir: str, log_path: str, argv: list[str]):
        self.proc, self.port, self.base_dir, self.log_path, self.argv = proc, port, base_dir, log_path, argv
        self.url = f"http://127.0.0.1:{port}"
        self._object_info = None

    # --- HTTP ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body=None, timeout: float = 30.0) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def get(self, path: str):
        status, out = self.request("GET", path)
        assert status == 200, f"GET {path} -> {status}: {out}\n{self.log_tail()}"
        return out

    def get_bytes(self, path: str) -> tuple[int, bytes]:
        try:
            with _OPENER.open(self.url + path, timeout=30.0) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get("/object_info")
        return self._object_info

    # --- prompts ---------------------------------------------------------------------------------
    def submit(self, prompt: dict) -> tuple[int, dict]:
        """POST an API-format prompt; returns (HTTP status, reply)."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": "safedig-tests"})

    def queue(self, prompt: dict) -> str:
        status, out = self.submit(prompt)
        assert status == 200 and "prompt_id" in out, f"/prompt refused the prompt ({status}): {out}"
        return out["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """The /history entry of a finished prompt (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            h = self.get(f"/history/{prompt_id}")
            if prompt_id in h:  # ComfyUI writes the entry once the prompt has finished, either way
                return h[prompt_id]
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s\n{self.log_tail()}")

    def run(self, prompt: dict) -> dict:
        return self.wait(self.queue(prompt))

    def output_path(self, file: dict) -> str:
        assert file.get("type") == "output", file
        return os.path.join(self.base_dir, "output", file.get("subfolder", ""), file["filename"])

    # --- process ---------------------------------------------------------------------------------
    def alive(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"the ComfyUI server exited with {self.proc.returncode}\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return "(no server log)"
        return "--- server log (tail) ---\n" + text[-chars:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def _prepare_base(base: str) -> dict:
    """Fill the server's base directory; returns extra environment for the server process."""
    nodes_dir = os.path.join(base, "custom_nodes")
    os.makedirs(nodes_dir)
    os.symlink(REPO, os.path.join(nodes_dir, "SafeDIG"), target_is_directory=True)
    os.symlink(TEST_PACK, os.path.join(nodes_dir, "safedig_test_nodes"), target_is_directory=True)
    for sub in ("user", "output", "input", "temp"):
        os.makedirs(os.path.join(base, sub))
    for name, (family, width, positions) in DICTIONARIES.items():
        save(make_dictionary(family, width, positions), os.path.join(base, "models", "sae", name))
    env = {}
    return env


def start_server(base: str) -> ComfyServer:
    from safedig_core.adapters.comfy.runtime import ComfyUINotFound, comfyui_path

    try:
        comfy = comfyui_path()
    except ComfyUINotFound as e:
        pytest.skip(str(e))
    env = {**os.environ, **_prepare_base(base), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    argv = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", base, "--disable-auto-launch", "--disable-api-nodes",
            "--database-url", "sqlite:///:memory:"]
    log_path = os.path.join(base, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=comfy, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = ComfyServer(proc, port, base, log_path, argv)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            server.alive()
            try:
                status, _ = server.request("GET", "/system_stats", timeout=2.0)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s\n{server.log_tail()}")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    """The running server; always stopped at the end of the session."""
    server = start_server(str(tmp_path_factory.mktemp("comfy_server")))
    try:
        yield server
    finally:
        server.stop()


def combo_options(spec: list) -> list | None:
    """The options of a combo input spec from /object_info, in either of the shapes ComfyUI uses:
    legacy nodes `[[options...], {...}]`, V3 (comfy_api io.Combo) nodes `["COMBO", {"options": [...]}]`."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return (spec[1] if len(spec) > 1 else {}).get("options", [])
    return None


def input_type(spec: list) -> str:
    return "COMBO" if combo_options(spec) is not None else spec[0]


def input_specs(info: dict) -> dict[str, list]:
    """name -> spec of a node's required and optional inputs, in the node's input order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    return {name: info["input"][group][name] for group in ("required", "optional") for name in order.get(group, [])}
