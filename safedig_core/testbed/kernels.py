"""Portable CPU kernels for the testbed's measurements, so that a figure does not move with the machine's CPU.

Three choices made at run time make a CPU run's floating point depend on the machine, and with it the trained
dictionaries, the chosen τ and the unsafe rates (issue 13, item 6: the same `safedig demo` gave other figures on
another machine of the same kind):
- PyTorch compiles its vectorised kernels (softmax, norms, reductions, ...) once per instruction set and picks
  the best one the CPU has (`ATEN_CPU_CAPABILITY`: AVX-512 here, AVX2 on many machines);
- MKL, PyTorch's BLAS on x86, picks its code path per CPU model, and not the same one on Intel and AMD processors
  (`MKL_CBWR`, MKL's conditional numerical reproducibility);
- oneDNN, which runs some of PyTorch's CPU operators (the text encoder's GELU, for one), JIT-compiles its kernels
  for the best instruction set it finds (`ONEDNN_MAX_CPU_ISA` caps it; `DNNL_MAX_CPU_ISA` is its older name).

`use_portable()` fixes all three to the AVX2 paths, which every x86-64 machine of the last decade has. Each setting is
read when first used, so it must run before the process's first tensor operation; it leaves alone what the user
set. `describe()` says what is in force, for the report; `add_flag` and `choose` give a command its
`--native-kernels` opt-out.
"""
from __future__ import annotations

import os
import platform

PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
_OLDER_NAMES = {"ONEDNN_MAX_CPU_ISA": ("DNNL_MAX_CPU_ISA",)}  # a user who set an older name has set it
NAMES = tuple(PORTABLE) + tuple(n for older in _OLDER_NAMES.values() for n in older)  # every variable read here

FLAG_HELP = ("the CPU's fastest kernels (AVX-512 where it has them) rather than the portable AVX2 ones "
             "(safedig_core/testbed/kernels.py): faster on some machines, figures that move with the CPU")


def _user_value(key: str) -> str | None:
    for name in (key, *_OLDER_NAMES.get(key, ())):
        if name in os.environ:
            return os.environ[name]
    return None


def use_portable() -> dict[str, str]:
    """Ask for the AVX2 kernels on x86 machines (elsewhere nothing changes); returns the settings now in force."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        for key, value in PORTABLE.items():
            if _user_value(key) is None:
                os.environ[key] = value
    return {k: os.environ[k] for k in PORTABLE if k in os.environ}


def add_flag(parser) -> None:
    """A command's `--native-kernels` opt-out (argparse)."""
    parser.add_argument("--native-kernels", action="store_true", help=FLAG_HELP)


def choose(native: bool) -> None:
    """The portable kernels unless `native`; call it before the first tensor operation."""
    if not native:
        use_portable()


def describe() -> dict[str, str]:
    """The kernels in force: PyTorch's CPU capability (as PyTorch reports it), and MKL's code path and oneDNN's cap as
    the environment asks for them ("auto": the library's own choice; each reads its setting once, at its first call)."""
    import torch

    return {"aten": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": _user_value("MKL_CBWR") or "auto",
            "onednn_isa": _user_value("ONEDNN_MAX_CPU_ISA") or "auto"}
