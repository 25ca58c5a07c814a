"""Building on several processes (torchrun, gloo on CPU): collection writes byte for byte the store a single
process writes, a run whose rank was killed resumes, with any number of processes, to the same bytes, and
`build` (positions dealt over the ranks for training and adaptation) writes the single-process dictionary."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from safedig_core.pipeline.distributed import SINGLE, Ranks, from_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
CATEGORY = {1: "violence", 3: "fire"}
PROMPTS = "\n".join(["prompt,label,category,domain"] + [
    f"a picture number {i},{'unsafe' if i % 2 else 'safe'},{CATEGORY.get(i % 4, '')},{'target' if i >= 12 else 'source'}"
    for i in range(16)])
ARGS = ["collect", "--tiny", "flux", "--steps", "2", "--record-steps", "0,1", "--token-budget", "4",
        "--prompts-per-shard", "2", "--positions", "double.0.img,single.0.txt"]


def test_ranks_deal_round_robin():
    assert [k for k in range(7) if Ranks(1, 3).owns(k)] == [1, 4]
    assert all(SINGLE.owns(k) for k in range(5)) and SINGLE.main


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_env() == SINGLE


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                      "MASTER_PORT")}


def _collect(tmp_path, out, nproc: int, wait: bool = True):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(PROMPTS)
    return _run(tmp_path, ARGS + ["--prompts", str(prompts), "--out", str(out)], nproc, wait)


def _run(tmp_path, cli: list[str], nproc: int, wait: bool = True):
    if nproc == 1:
        cmd = [sys.executable, "-m", "safedig_core", *cli]
    else:
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "safedig_core", *cli]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    if not wait:
        return proc
    out_, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out_


def _files(path) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _collect(tmp, tmp / "store", 1)
    return _files(tmp / "store")


@pytest.mark.slow
def test_two_ranks_write_the_single_process_store(single, tmp_path):
    _collect(tmp_path, tmp_path / "store", 2)
    got = _files(tmp_path / "store")
    assert list(got) == list(single), "the same files, no manifest fragments left"
    assert got == single
    assert json.loads(got["manifest.json"])["complete"]


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_same_store(single, tmp_path):
    store = tmp_path / "store"
    proc = _collect(tmp_path, store, 2, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once some shards are written, not all
        if store.is_dir() and sum(n.startswith("shard-") for n in os.listdir(store)) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    done = sorted(n for n in os.listdir(store) if n.startswith("shard-"))
    assert 0 < len(done) < 8, f"the kill should land mid-run (shards then: {done})"
    _collect(tmp_path, store, 1)  # any number of processes resumes it; one here
    assert _files(store) == single
    shutil.rmtree(store)


BUILD = ["--top", "2", "--expansion", "2", "-k", "4", "--steps", "30", "--adapt-steps", "10", "--batch-size", "32"]


@pytest.mark.slow
def test_two_ranks_build_the_single_process_dictionary(single, tmp_path):
    from safedig_core.formats.dictionary import load

    store = tmp_path / "store"
    store.mkdir()
    for name, data in single.items():
        (store / name).write_bytes(data)
    out = {}
    for nproc in (1, 2):
        path = tmp_path / f"d{nproc}.safetensors"
        _run(tmp_path, ["build", str(store), "--out", str(path), "--work", str(tmp_path / f"w{nproc}"), *BUILD], nproc)
        out[nproc] = load(str(path))
    one, two = out[1], out[2]
    assert one.positions == two.positions and len(one.positions) == 2
    for p in one.positions:
        a, b = one.entries[p], two.entries[p]
        assert a.harmful == b.harmful and a.gate_scale == pytest.approx(b.gate_scale, rel=1e-6)
        for name, t in a.sae.state_dict().items():
            assert torch.allclose(t, b.sae.state_dict()[name], atol=1e-6), (p, name)
    assert one.provenance["adapted"] == two.provenance["adapted"]
