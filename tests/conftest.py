"""Shared fixtures: the real ComfyUI runtime (imported as a library, on the CPU) with this pack loaded
through ComfyUI's own custom-node loader, and small dictionaries for tiny models."""
from __future__ import annotations

import asyncio
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from safedig_core.formats.dictionary import DictionaryEntry, SafetyDictionary  # noqa: E402
from safedig_core.positions import parse  # noqa: E402
from safedig_core.sae import SparseAutoencoder  # noqa: E402


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI's `nodes` module, with SafeDIG loaded by `nodes.load_custom_node` as ComfyUI would."""
    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    import nodes

    if "SafeDIGApplySteering" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(REPO)), "ComfyUI failed to load the SafeDIG pack"
    return nodes


def make_dictionary(family: str, width: int, positions: list[str], latents: int = 96, k: int = 8,
                    harmful: int = 6, fire: bool = True, seed: int = 0, scale: float = 1.0) -> SafetyDictionary:
    """Random-weight SAEs; the harmful latents get a large positive (fire) or negative (never fire) bias."""
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name in positions:
        p = parse(name)
        sae = SparseAutoencoder.init_random(width, latents, k, scale=scale, generator=g)
        with torch.no_grad():
            sae.b_enc[:harmful] = 50.0 if fire else -1e4
        entries[p] = DictionaryEntry(p, sae, list(range(harmful)), [1.0 - 0.1 * i for i in range(harmful)])
    return SafetyDictionary(family, entries, {"blend": 1.0, "repel": 1.0}, {"made_by": "tests"})


# CI runs the property tests on a fixed set of examples (reproducible runs); locally they explore anew.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, database=None, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models and data of the tests are tiny: on a shared 2-core machine, intra-op threads only fight
    over the cores (tiny-model sampling ran about 10x faster on one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def environment_restored():
    """A test that runs a CLI command in this process sets the demo's kernel variables (ATEN_CPU_CAPABILITY,
    MKL_CBWR, ONEDNN_MAX_CPU_ISA: safedig_core/testbed/kernels.py) in os.environ; a later test's subprocess would
    inherit them and compute with other kernels than this process (on an AVX-512 machine, other bits: the
    SIGKILL resume test failed that way). Each test leaves the environment as it found it."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)
