"""What does SafeDIG steering cost next to the DiT block it steers?

Times, side by side on the CPU in one run: (a) one FLUX-width double-stream block (ComfyUI's real
`DoubleStreamBlock`, random weights) unsteered; (b) the same block followed by `PositionSteerer.steer`
on its img output in a few configurations; (c) the SAE encoder product alone (`x @ W_enc.T`), the floor
an exact method cannot beat since the gate needs every token's TopK code. It prints, per configuration,
ratio = (steered − unsteered) / floor; the project's goal is ≤ 1.2. It also traces one steering call
per configuration and checks that the decode is sparse: the only products over all latents are the
encoder's, and the full decoder W_dec is never read.

    python benchmarks/steering_overhead.py            # full size (a few minutes on 2 cores, ~3 GB)
    python benchmarks/steering_overhead.py --quick    # smoke run in seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safedig_core import comfyui  # noqa: E402
from safedig_core.sae import SparseAutoencoder  # noqa: E402
from safedig_core.steering import PositionSteerer, SteeringConfig  # noqa: E402

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "dot", "_addmm_activation"}


class OpTrace(TorchDispatchMode):
    """Records the dense products and embedding bags one call runs, with their operand shapes."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, latents: int):
        super().__init__()
        self.enc, self.dec = W_enc.untyped_storage().data_ptr(), W_dec.untyped_storage().data_ptr()
        self.latents, self.encoder, self.bad, self.bags = latents, 0, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        if self.dec in ptrs:
            self.bad.append(f"{name} reads W_dec")
        if name in PRODUCTS and any(self.latents in t.shape for t in tensors):
            if self.enc in ptrs:
                self.encoder += 1
            else:
                self.bad.append(f"{name} {[tuple(t.shape) for t in tensors]}")
        if name.startswith("_embedding_bag") or name == "embedding_bag":
            self.bags.append(tuple(args[0].shape))
            if args[0].shape[0] >= self.latents:
                self.bad.append(f"{name} over {tuple(args[0].shape)}")
        return func(*args, **(kwargs or {}))


def grid(n: int) -> tuple[int, int]:
    h = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return h, n // h


def build_block(hidden: int, heads: int, seed: int = 0):
    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock
    block = DoubleStreamBlock(hidden, heads, mlp_ratio=4.0, qkv_bias=True, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the ops skip init: small random weights keep the residual stream near its input
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return block.eval().requires_grad_(False)


def rope(img_tokens: int, txt_tokens: int):
    from comfy.ldm.flux.layers import EmbedND
    h, w = grid(img_tokens)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] += torch.arange(h).float()[:, None]
    img_ids[..., 2] += torch.arange(w).float()[None, :]
    ids = torch.cat([torch.zeros(1, txt_tokens, 3), img_ids.reshape(1, -1, 3)], dim=1)
    return EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids)


def harmful_input(img: torch.Tensor, D_H: torch.Tensor, frac: float, g: torch.Generator, strength=8.0, per=4):
    """img with 1..`per` harmful decoder directions written into a fraction `frac` of its tokens."""
    out = img.clone()
    n, h = img.shape[1], D_H.shape[0]
    tokens = torch.randperm(n, generator=g)[: round(frac * n)]
    for t in tokens.tolist():
        pick = torch.randperm(h, generator=g)[: int(torch.randint(1, per + 1, (1,), generator=g))]
        out[0, t] += strength * D_H[pick].sum(0)
    return out


def median_ms(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall time of each callable, the callables interleaved round-robin so drift hits all alike."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (text tokens: a quarter)")
    ap.add_argument("--latents", type=int, default=49152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--harmful", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    hidden, heads = 3072, 24
    if a.quick:
        hidden, heads, a.tokens, a.latents, a.k, a.harmful, a.repeats = 256, 2, 64, 2048, 16, 8, 3
    if a.threads:
        torch.set_num_threads(a.threads)
    comfyui.bootstrap(cpu=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    txt_tokens = max(a.tokens // 4, 1)
    block = build_block(hidden, heads)
    pe = rope(a.tokens, txt_tokens)
    img0 = torch.randn(1, a.tokens, hidden, generator=g)
    txt = torch.randn(1, txt_tokens, hidden, generator=g)
    vec = torch.randn(1, hidden, generator=g)
    sae = SparseAutoencoder.init_random(hidden, a.latents, k=a.k, generator=g)
    harmful = torch.randperm(a.latents, generator=g)[: a.harmful]
    steerer = PositionSteerer(sae, harmful).to("cpu", torch.float32)
    D_H = sae.W_dec[harmful].detach()
    inputs = {"10%": harmful_input(img0, D_H, 0.10, g), "100%": harmful_input(img0, D_H, 1.0, g)}
    tau = 4.0  # above the natural top-k values of random tokens, below the written-in directions
    configs = {f"gate {gate}, {label}": (gate, SteeringConfig(threshold=tau, **kw))
               for gate in inputs for label, kw in [("Repel", dict(repel=1.0)),
                                                    ("Blend+Repel", dict(blend=1.0, repel=1.0))]}

    def run_block(img):
        return block(img.clone(), txt.clone(), vec, pe)[0]

    def run_steered(img, cfg):
        return steerer.steer(run_block(img), cfg)

    W_enc, x_enc = sae.W_enc.detach(), torch.randn(a.tokens, hidden, generator=g)
    with torch.inference_mode():
        gate_frac, sparse_ok, trace_lines = {}, True, []
        for name, (gate, cfg) in configs.items():
            out = run_block(inputs[gate])
            gate_frac[name] = float((steerer.harmful_mass(out) > tau).float().mean())
            trace = OpTrace(sae.W_enc, sae.W_dec, a.latents)
            with trace:
                steered = steerer.steer(out, cfg)
            changed = float((steered != out).any(-1).float().mean())
            sparse_ok &= not trace.bad and trace.encoder >= 1
            trace_lines.append(f"  {name:<24} encoder products {trace.encoder}, decode bags over "
                               f"{sorted(set(trace.bags))}, other dense products over {a.latents} latents: "
                               f"{trace.bad or 'none'}; tokens changed {changed:.1%}")
        fns = {"unsteered": lambda: run_block(inputs["10%"]), "floor": lambda: x_enc @ W_enc.T}
        fns.update({name: (lambda gate=gate, cfg=cfg: run_steered(inputs[gate], cfg))
                    for name, (gate, cfg) in configs.items()})
        ms = median_ms(fns, a.repeats)

    base, floor = ms["unsteered"], ms["floor"]
    print(f"SafeDIG steering overhead on CPU ({torch.get_num_threads()} threads): DoubleStreamBlock hidden {hidden}, "
          f"{heads} heads, {a.tokens} img + {txt_tokens} txt tokens; SAE {a.latents} latents, k={a.k}, "
          f"{a.harmful} harmful; median of {a.repeats}")
    print(f"{'configuration':<34}{'gate':>7}{'ms':>10}{'overhead':>10}{'ratio':>8}")
    print(f"{'block unsteered':<34}{'':>7}{base:>10.1f}")
    print(f"{'floor x @ W_enc.T':<34}{'':>7}{floor:>10.1f}")
    rows = []
    for name in configs:
        ratio = (ms[name] - base) / floor
        rows.append({"config": name, "gate": gate_frac[name], "ms": ms[name], "ratio": ratio})
        print(f"{'block + ' + name:<34}{gate_frac[name]:>7.1%}{ms[name]:>10.1f}{ms[name] - base:>10.1f}"
              f"{ratio:>8.2f}  {'ok' if ratio <= 1.2 else 'ABOVE 1.2'}")
    print("sparse decode check (one traced steering call per configuration):")
    print("\n".join(trace_lines))
    print(f"sparse decode: {'yes' if sparse_ok else 'NO'} (no dense product over all latents besides the encoder; "
          f"W_dec never read)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "hidden": hidden, "threads": torch.get_num_threads(),
                       "unsteered_ms": base, "floor_ms": floor, "configs": rows, "sparse_decode": sparse_ok}, f, indent=2)
    return 0 if sparse_ok else 1


if __name__ == "__main__":
    sys.exit(main())
