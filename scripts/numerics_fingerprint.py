"""Fingerprints of the testbed's floating point, under the CPU's native kernels and under the portable ones that
`safedig demo` uses (`safedig_core/testbed/kernels.py`). Run it on two machines and compare the lines: equal
portable lines mean the demo computes the same bits on both (issue 13, item 6). CI prints it after the suite.

    python scripts/numerics_fingerprint.py

Each line: the kernels in force, then a hash of 4 testbed images (10 sampler steps through ComfyUI, 2 threads)
and of a TopK SAE's encoder after 30 Adam steps on their pixels (a stand-in for activations).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(t) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def fingerprint() -> str:
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(2)
    from safedig_core.adapters.comfy import runtime as comfyui

    comfyui.bootstrap(cpu=True)
    from safedig_core.sae import SparseAutoencoder
    from safedig_core.testbed import kernels, world
    from safedig_core.testbed.model import generate, load_testbed

    model, encode_fn = load_testbed()
    rows = world.prompt_sets(0)["eval"][:4]
    images = generate(model, encode_fn, [r["prompt"] for r in rows], [r["seed"] for r in rows], steps=10, cfg=3.0)
    torch.manual_seed(0)
    data = images.permute(0, 2, 3, 1).reshape(-1, 3 * 4).repeat(1, 8)  # [tokens, 96]: a DiT-width stand-in
    sae = SparseAutoencoder(data.shape[1], 384, 8)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(30):
        loss = (sae(data) - data).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    k = kernels.describe()
    return (f"aten {k['aten']:7s} mkl {k['mkl_cbwr']:5s} onednn {k['onednn_isa']:5s} images {_digest(images)} "
            f"sae {_digest(sae.W_enc)}")


def main() -> int:
    if "--here" in sys.argv:
        print(fingerprint(), flush=True)
        return 0
    sys.path.insert(0, ROOT)
    from safedig_core.testbed.kernels import NAMES, PORTABLE

    base = {k: v for k, v in os.environ.items() if k not in NAMES}
    portable = dict(base, **PORTABLE)
    for name, env in (("native", base), ("portable", portable)):
        run = subprocess.run([sys.executable, os.path.abspath(__file__), "--here"], env=env, capture_output=True,
                             text=True, timeout=600)
        line = run.stdout.strip().splitlines()[-1] if run.returncode == 0 and run.stdout.strip() else \
            f"failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}"
        print(f"numerics fingerprint, {name:8s} kernels: {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
