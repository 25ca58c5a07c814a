"""The benchmarks still run: their --quick modes, as subprocesses (steering_overhead.py prints a ratio line for
each configuration and finds the decode sparse; sae_training.py and train_step.py print their ratios;
collection_overhead.py its extra time, on the testbed DiT and on a wider model)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.comfy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need_comfyui() -> None:
    from safedig_core.adapters.comfy.runtime import ComfyUINotFound, comfyui_path

    try:
        comfyui_path()
    except ComfyUINotFound as e:
        pytest.skip(str(e))


def _bench(script: str, *args: str, timeout: int) -> str:
    """Run benchmarks/`script` --quick with `args` as a user would; its stdout (failing with all output)."""
    run = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), "--quick", *args],
                         check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_steering_overhead_quick(tmp_path):
    _need_comfyui()
    out = tmp_path / "result.json"
    stdout = _bench("steering_overhead.py", "--threads", "1", "--json", str(out), timeout=120)
    ratio_lines = re.findall(r"^block \+ gate .*\s(\d+\.\d\d)  (ok|ABOVE 1\.2)$", stdout, re.MULTILINE)
    assert len(ratio_lines) == 4, stdout
    assert "sparse decode: yes" in stdout
    result = json.loads(out.read_text())
    assert result["sparse_decode"] and len(result["configs"]) == 4
    assert all(c["ratio"] > 0 and c["ms"] > 0 for c in result["configs"])


def test_steering_overhead_gate_comparison_quick(tmp_path):
    """--gate-only at the --quick sizes: the exact and fast gates' cost lines, and their agreement on the planted
    inputs and on a couple of testbed prompts' activations."""
    _need_comfyui()
    out = tmp_path / "gate.json"
    stdout = _bench("steering_overhead.py", "--gate-only", "--threads", "1", "--testbed-prompts", "2", "--json",
                    str(out), timeout=180)
    lines = re.findall(r"^(safe|10%|100%) .*\d+\.\d%\s+100\.00%\s+0  (ok|ABOVE 5 %)$", stdout, re.MULTILINE)
    assert len(lines) == 3, stdout
    assert "gate agreement: yes" in stdout
    gate = json.loads(out.read_text())["gate"]
    assert gate["agree"] and len(gate["planted"]) == 3 and gate["testbed"]
    assert all(r["fast_ms"] > 0 and r["exact_ms"] > 0 and r["agree"] == 1.0 for r in gate["planted"])
    assert all(r["missed_above_2_units"] == 0 and r["image_flags_agree"] == 1.0 for r in gate["testbed"])


def test_sae_training_benchmark_quick(tmp_path):
    """benchmarks/sae_training.py runs both trainers on the same batches and prints the two ratios."""
    out = tmp_path / "result.json"
    stdout = _bench("sae_training.py", "--json", str(out), timeout=300)
    assert re.search(r"^tokens/s   SafeDIG \d+   sparsify \d+   ratio \d+\.\d\d", stdout, re.MULTILINE), stdout
    result = json.loads(out.read_text())
    assert result["tokens"] == 256 * 20 and all(v > 0 for v in result["tokens_per_s"].values())
    assert all(0 < v < float("inf") for v in result["heldout_fvu"].values())


def test_train_step_benchmark_quick(tmp_path):
    """benchmarks/train_step.py times both backward passes of train_sae and prints their ratio."""
    out = tmp_path / "result.json"
    stdout = _bench("train_step.py", "--json", str(out), timeout=120)
    assert re.search(r"^sparse / dense +\d+\.\d\d$", stdout, re.MULTILINE), stdout
    result = json.loads(out.read_text())
    assert result["dense_s"] > 0 and result["sparse_s"] > 0 and result["dead_frac"] > 0, result


@pytest.mark.parametrize("model", [[], ["--width", "128", "--image-size", "8"]], ids=["testbed", "wide"])
def test_collection_overhead_quick(tmp_path, model):
    """benchmarks/collection_overhead.py collects and samples the same prompts, on the testbed DiT or a wider
    random-weight FLUX, and prints the extra time."""
    _need_comfyui()
    out = tmp_path / "overhead.json"
    stdout = _bench("collection_overhead.py", "--threads", "1", "--json", str(out), *model, timeout=300)
    line = r"^plain sampling \d+\.\d\d s   collecting \d+\.\d\d s   extra [+-]\d+\.\d%"
    assert re.search(line, stdout, re.MULTILINE), stdout
    result = json.loads(out.read_text())
    assert all(t > 0 for ts in result["seconds"].values() for t in ts) and len(result["seconds"]["plain"]) == 2
