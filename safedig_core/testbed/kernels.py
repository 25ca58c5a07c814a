"""Portable CPU kernels for the testbed's measurements, so that a figure does not move with the machine's CPU.

Two choices made at run time make a CPU run's floating point depend on the machine, and with it the trained
dictionaries, the chosen τ and the unsafe rates (issue 13, item 6: the same `safedig demo` gave other figures on
another machine of the same kind):
- PyTorch compiles its vectorised kernels (softmax, norms, reductions, ...) once per instruction set and picks
  the best one the CPU has (`ATEN_CPU_CAPABILITY`: AVX-512 here, AVX2 on many machines);
- MKL, PyTorch's BLAS on x86, picks its code path per CPU model, and not the same one on Intel and AMD processors
  (`MKL_CBWR`, MKL's conditional numerical reproducibility);
- oneDNN, which runs some of PyTorch's CPU operators (the text encoder's GELU, for one), JIT-compiles its kernels
  for the best instruction set it finds (`ONEDNN_MAX_CPU_ISA` caps it; `DNNL_MAX_CPU_ISA` is its older name).

`use_portable()` fixes all three to the AVX2 paths, which every x86-64 machine of the last decade has. Both settings are
read when first used, so it must run before the process's first tensor operation; it leaves alone what the user
set. `describe()` says what is in force, for the report.
"""
from __future__ import annotations

import os
import platform

PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_OLDER_NAMES = {"ONEDNN_MAX_CPU_ISA": "DNNL_MAX_CPU_ISA"}  # a user who set the old name has set it


def use_portable() -> dict[str, str]:
    """Ask for the AVX2 kernels on x86 machines (elsewhere nothing changes); returns the settings now in force."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in PORTABLE.items():
            if _OLDER_NAMES.get(key, key) not in os.environ:
                os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in PORTABLE if k in os.environ}


def describe() -> dict[str, str]:
    """The kernels in force: PyTorch's CPU capability (as PyTorch reports it), and MKL's code path and oneDNN's cap as
    the environment asks for them ("auto": the library's own choice; each reads its setting once, at its first call)."""
    import torch

    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "auto"))
    return {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR", "auto"),
            "onednn_isa": onednn}
