"""`testbed.kernels`: the portable CPU kernels the demo asks for, and what it leaves to the user."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from safedig_core.testbed import kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_use_portable_sets_only_what_the_user_left_unset(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert kernels.use_portable() == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE",
                                      "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["MKL_CBWR"] == "COMPATIBLE"


def test_onednn_older_name_counts_as_set(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE")
    assert "ONEDNN_MAX_CPU_ISA" not in kernels.use_portable()
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ


def test_use_portable_changes_nothing_off_x86(monkeypatch):
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert kernels.use_portable() == {}
    assert not {"ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"} & set(os.environ)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 only")
def test_asked_for_before_the_first_tensor_operation_they_are_in_force():
    """What the CLI does (set, then compute): PyTorch reports the AVX2 kernels, MKL's setting is in force, and
    oneDNN (which runs GELU on CPU) compiles an AVX2 kernel, as its own log says."""
    code = ("from safedig_core.testbed import kernels; kernels.use_portable(); import torch; "
            "torch.ones(3).softmax(0); torch.nn.functional.gelu(torch.randn(4, 20, 64)); print(kernels.describe())")
    env = {k: v for k, v in os.environ.items() if k not in kernels.NAMES}
    env["ONEDNN_VERBOSE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str({"aten": "AVX2", "mkl_cbwr": "AVX2", "onednn_isa": "AVX2"})
    ran = [line for line in out.stdout.splitlines() if line.startswith("onednn_verbose") and ",exec," in line]
    if ran:  # a torch built without oneDNN (or one that no longer routes GELU there) logs nothing
        assert all(":avx2" in line and "avx512" not in line for line in ran), ran
