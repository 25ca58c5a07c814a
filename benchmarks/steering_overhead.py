"""What does SafeDIG steering cost next to the DiT block it steers?

Times, side by side on the CPU in one run: (a) one FLUX-width double-stream block (ComfyUI's real
`DoubleStreamBlock`, random weights) unsteered; (b) the same block followed by `PositionSteerer.steer`
on its img output in a few configurations; (c) the SAE encoder product alone (`x @ W_enc.T`), the floor
an exact method cannot beat since the gate needs every token's TopK code. It prints, per configuration,
ratio = (steered − unsteered) / floor, the project's goal being ≤ 1.2; on a shared machine both are taken
within each run (the steering part's own time, then the floor product right after it) and the ratio is
the median over runs, so that other load shifts numerator and denominator alike. It also traces one steering call
per configuration and checks that the decode is sparse: the only products over all latents are the
encoder's, and the full decoder W_dec is never read.

It then sets the exact gate beside the fast one (`SteeringConfig.fast_gate`, `safedig_core/fast_gate.py`): each
one's cost, the time to decide which tokens the gate passes, as a share of the unsteered block (goal for the
fast gate ≤ 5 %), on a safe input (no harmful direction written in) and the two planted ones; and its agreement
with the exact gate (goal ≥ 99 % of tokens, no token missed that the exact gate passes with a mass above 2
gate units), on those planted sets and on the testbed's own activations (the committed testbed DiT sampled
through ComfyUI, recorded at its committed dictionary's positions, gated at τ = 1 per token and per image).
On the safe input it also times the fast gate's parts (each stage of its cascade of screens, the gather of the
rows a stage does not keep, the exact code of the tokens left), each as a share of the block.

    python benchmarks/steering_overhead.py            # full size: ~5 minutes on 2 cores, ~3.5 GB
    python benchmarks/steering_overhead.py --gate-only    # only the gate comparison, about a minute
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
from safedig_core import fast_gate
from safedig_core.adapters.comfy import runtime as comfyui
from safedig_core.sae import SparseAutoencoder
from safedig_core.steering import PositionSteerer, SteeringConfig

PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "dot", "_addmm_activation"}


class OpTrace(TorchDispatchMode):
    """Records the dense products and embedding bags one call runs, with their operand shapes, and the
    time of every op: in encoder products (`enc_s`) and outside them (`rest_s`, per op name)."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor, latents: int):
        super().__init__()
        self.enc, self.dec = W_enc.untyped_storage().data_ptr(), W_dec.untyped_storage().data_ptr()
        self.latents, self.encoder, self.bad, self.bags = latents, 0, [], []
        self.enc_s, self.rest_s = 0.0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
        if self.dec in ptrs:
            self.bad.append(f"{name} reads W_dec")
        encoder = False
        if name in PRODUCTS and any(self.latents in t.shape for t in tensors):
            if self.enc in ptrs:
                self.encoder, encoder = self.encoder + 1, True
            else:
                self.bad.append(f"{name} {[tuple(t.shape) for t in tensors]}")
        if name.startswith("_embedding_bag") or name == "embedding_bag":
            self.bags.append(tuple(args[0].shape))
            if args[0].shape[0] >= self.latents:
                self.bad.append(f"{name} over {tuple(args[0].shape)}")
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if encoder:
            self.enc_s += time.perf_counter() - t0
        else:
            self.rest_s[name] = self.rest_s.get(name, 0.0) + time.perf_counter() - t0
        return out

    def summary(self) -> str:
        top = sorted(self.rest_s.items(), key=lambda kv: -kv[1])[:3]
        return (f"encoder {self.enc_s * 1e3:.0f} ms, everything else {sum(self.rest_s.values()) * 1e3:.0f} ms ("
                + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in top) + ")")


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


SYNC = lambda: None  # noqa: E731 -- torch.cuda.synchronize when timing on a GPU


def segments(*steps) -> list[tuple[float, float]]:
    """Run `steps` as a chain (each gets the previous one's result); each one's (wall, process CPU) seconds
    (on a GPU the device is synchronised around each step, so wall time is the kernels' time)."""
    out, times = None, []
    for step in steps:
        SYNC()
        w, c = time.perf_counter(), time.process_time()
        out = step(out)
        SYNC()
        times.append((time.perf_counter() - w, time.process_time() - c))
    return times


def medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Per callable, the median over `repeats` rounds of each number it returns (and all the rounds); the
    callables run interleaved round-robin so that drift and other load on the machine hit all of them alike."""
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: [statistics.median(col) for col in zip(*v)] for name, v in runs.items()}, runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens (text tokens: a quarter)")
    ap.add_argument("--latents", type=int, default=49152)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--harmful", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--gate-only", action="store_true", help="only the exact vs fast gate comparison")
    ap.add_argument("--probes", type=int, default=None, help="the fast gate's probe latents (default: its own)")
    ap.add_argument("--refine", type=int, default=None,
                    help="probe latents of the fast gate's second screen (default: its own; 0: none)")
    ap.add_argument("--testbed-prompts", type=int, default=16, help="testbed prompts recorded (0: skip the testbed)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the testbed part always runs on the CPU)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the block's, the activations' and the steering working copy's dtype")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    global SYNC
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if dev.type == "cuda":
        SYNC = torch.cuda.synchronize
    hidden, heads = 3072, 24
    if a.quick:
        hidden, heads, a.tokens, a.latents, a.k, a.harmful, a.repeats = 256, 2, 64, 2048, 16, 8, 3
        a.testbed_prompts = min(a.testbed_prompts, 2)
    if a.threads:
        torch.set_num_threads(a.threads)
    comfyui.bootstrap(cpu=True)

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    txt_tokens = max(a.tokens // 4, 1)
    block = build_block(hidden, heads).to(dev, dtype)
    pe = rope(a.tokens, txt_tokens).to(dev)
    img0 = torch.randn(1, a.tokens, hidden, generator=g)
    txt = torch.randn(1, txt_tokens, hidden, generator=g).to(dev, dtype)
    vec = torch.randn(1, hidden, generator=g).to(dev, dtype)
    sae = SparseAutoencoder.init_random(hidden, a.latents, k=a.k, generator=g)
    harmful = torch.randperm(a.latents, generator=g)[: a.harmful]
    steerer = PositionSteerer(sae, harmful).to(dev, dtype)
    D_H = sae.W_dec[harmful].detach()
    inputs = {"10%": harmful_input(img0, D_H, 0.10, g).to(dev, dtype),
              "100%": harmful_input(img0, D_H, 1.0, g).to(dev, dtype)}
    img0 = img0.to(dev, dtype)
    work = steerer._derived(dev, dtype)[0]  # the encoder copy steering uses on this device and dtype
    tau = 4.0  # above the natural top-k values of random tokens, below the written-in directions
    configs = {f"gate {gate}, {label}": (gate, SteeringConfig(threshold=tau, **kw))
               for gate in inputs for label, kw in [("Repel", {"repel": 1.0}),
                                                    ("Blend+Repel", {"blend": 1.0, "repel": 1.0})]}

    def run_block(img):  # the block adds into its img and txt inputs in place: give it copies
        return block(img.clone(), txt.clone(), vec, pe)[0]

    if a.probes is not None:
        fast_gate.PROBES = a.probes
    if a.refine is not None:
        fast_gate.REFINE = a.refine
    if a.gate_only:
        with torch.inference_mode():
            gate = compare_gates(steerer, {"safe": img0, **inputs}, run_block, tau, a.repeats, a.testbed_prompts)
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"args": vars(a), "hidden": hidden, "threads": torch.get_num_threads(), "gate": gate}, f,
                          indent=2)
        return 0 if gate["agree"] else 1

    W_enc, x_enc = work.W_enc.detach(), torch.randn(a.tokens, hidden, generator=g).to(dev, dtype)
    floor = lambda _: x_enc @ W_enc.T
    with torch.inference_mode():  # the block runs and the traced steering calls below double as the warm-up
        gate_frac, rest, sparse_ok, trace_lines = {}, {}, True, []
        floor(None)
        outs = {gate: run_block(img) for gate, img in inputs.items()}
        for name, (gate, cfg) in configs.items():
            gate_frac[name] = float((steerer.harmful_mass(outs[gate]) > tau).float().mean())
            with OpTrace(work.W_enc, sae.W_dec, a.latents) as trace:
                steered = steerer.steer(outs[gate], cfg)
            changed = float((steered != outs[gate]).any(-1).float().mean())
            sparse_ok &= not trace.bad and trace.encoder >= 1
            rest[name] = sum(trace.rest_s.values())
            trace_lines.append(f"  {name:<24} encoder products {trace.encoder}, embedding bags over "
                               f"{sorted(set(trace.bags))}, other products over all {a.latents} latents or reads of "
                               f"W_dec: {trace.bad or 'none'}; tokens changed {changed:.1%}\n{'':<27}time: "
                               + trace.summary())
        fns = {"unsteered": lambda: segments(lambda _: run_block(inputs["10%"]))[0]}
        for name, (gate, cfg) in configs.items():  # block, steering, then the floor right after: paired per run
            def run(gate=gate, cfg=cfg):
                (block_s, _), (steer_s, steer_c), (floor_s, floor_c) = segments(
                    lambda _: run_block(inputs[gate]), lambda out: steerer.steer(out, cfg), floor)
                return block_s + steer_s, steer_s, floor_s, steer_s / floor_s, steer_c / floor_c
            fns[name] = run
        med, runs = medians(fns, a.repeats)

    base = med["unsteered"][0] * 1e3
    floor_ms = statistics.median(r[2] for name in configs for r in runs[name]) * 1e3
    where = f"CPU ({torch.get_num_threads()} threads)" if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"SafeDIG steering overhead on {where}, {a.dtype}: DoubleStreamBlock hidden {hidden}, "
          f"{heads} heads, {a.tokens} img + {txt_tokens} txt tokens; SAE {a.latents} latents, k={a.k}, "
          f"{a.harmful} harmful; medians of {a.repeats} runs after a warm-up")
    print("overhead = steered − unsteered, taken within each run as the steering part's own time; floor = x @ W_enc.T "
          "timed right after it; ratio = median over runs of overhead / floor (goal ≤ 1.2), in wall time; cpu: the "
          "same in this process's CPU time; parts: 1 + (steering time outside its encoder product, from the traced "
          "call below) / floor, which other load on the machine disturbs least")
    print(f"{'configuration':<34}{'gate':>7}{'ms':>10}{'overhead':>10}{'floor':>10}{'ratio':>8}{'cpu':>6}{'parts':>7}")
    print(f"{'block unsteered':<34}{'':>7}{base:>10.1f}")
    print(f"{'floor x @ W_enc.T (all runs)':<34}{'':>7}{floor_ms:>10.1f}")
    rows = []
    for name in configs:
        total, over, fl = (t * 1e3 for t in med[name][:3])
        ratio, ratio_cpu = med[name][3:]
        parts = 1 + rest[name] * 1e3 / floor_ms
        rows.append({"config": name, "gate": gate_frac[name], "ms": total, "overhead_ms": over, "floor_ms": fl,
                     "ratio": ratio, "ratio_cpu": ratio_cpu, "ratio_parts": parts, "runs_s": runs[name]})
        print(f"{'block + ' + name:<34}{gate_frac[name]:>7.1%}{total:>10.1f}{over:>10.1f}{fl:>10.1f}{ratio:>8.2f}"
              f"{ratio_cpu:>6.2f}{parts:>7.2f}  {'ok' if ratio <= 1.2 else 'ABOVE 1.2'}")
    print("sparse decode check (one traced steering call per configuration):")
    print("\n".join(trace_lines))
    print(f"sparse decode: {'yes' if sparse_ok else 'NO'} (no dense product over all latents besides the encoder; "
          f"W_dec never read)")
    with torch.inference_mode():
        gate = compare_gates(steerer, {"safe": img0, **inputs}, run_block, tau, a.repeats, a.testbed_prompts)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "hidden": hidden, "threads": torch.get_num_threads(), "device": where,
                       "unsteered_ms": base, "floor_ms": floor_ms, "configs": rows, "sparse_decode": sparse_ok,
                       "gate": gate}, f, indent=2)
    return 0 if sparse_ok and gate["agree"] else 1


def exact_gate(steerer: PositionSteerer, x: torch.Tensor, floor: float) -> torch.Tensor:
    """[N] bool: the exact gate's decision per token (full TopK encode of every token)."""
    return steerer.harmful_mass(x.reshape(-1, x.shape[-1])) > floor


def fast_decision(steerer: PositionSteerer, x: torch.Tensor, floor: float) -> tuple[torch.Tensor, int]:
    """([N] bool, tokens the screen let through to the full encode): the fast gate's decision per token."""
    sae, lookup = steerer._derived(x.device, x.dtype)[:2]
    xs = sae.prepare(x.reshape(-1, x.shape[-1]))
    through = [0]

    def codes(ys):
        through[0] = ys.shape[0]
        return steerer.harmful_codes(sae, ys, lookup)

    token, _ = fast_gate.gated_codes(sae, steerer.harmful, xs, floor, codes)
    out = torch.zeros(xs.shape[0], dtype=torch.bool, device=xs.device)
    out[token] = True
    return out, through[0]


def agreement(steerer, x, floor, unit) -> dict:
    """Fast vs exact decisions on tokens x: share agreeing, tokens the fast gate missed that the exact gate passes
    with mass above 2 `unit`s, share of tokens screened through to the full encode, and share left after the
    cascade's first stage (the harmful rows alone)."""
    mass = steerer.harmful_mass(x.reshape(-1, x.shape[-1])).float()
    exact = mass > floor
    fast, through = fast_decision(steerer, x, floor)
    sae = steerer._derived(x.device, x.dtype)[0]
    first = fast_gate.Screen(sae, steerer.harmful, 0).may_pass(sae.prepare(x.reshape(-1, x.shape[-1])), sae.b_dec, floor)
    return {"tokens": int(exact.numel()), "agree": float((fast == exact).float().mean()),
            "missed_above_2_units": int((exact & ~fast & (mass > 2 * unit)).sum()), "exact_pass": float(exact.float().mean()),
            "screened": through / max(exact.numel(), 1), "after_harmful_rows": float(first.float().mean())}


def compare_gates(steerer, inputs: dict, run_block, tau: float, repeats: int, testbed_prompts: int) -> dict:
    """The exact and the fast gate side by side on the block's outputs for `inputs`, then on testbed activations."""
    outs = {name: run_block(img) for name, img in inputs.items()}
    floor = tau * steerer.gate_scale
    for x in outs.values():  # warm-up (also builds the fast gate's screen)
        exact_gate(steerer, x, floor), fast_decision(steerer, x, floor)
    fns = {"block": lambda: segments(lambda _: run_block(inputs["safe"]))[0]}
    for name, x in outs.items():
        fns[f"exact {name}"] = lambda x=x: segments(lambda _: exact_gate(steerer, x, floor))[0]
        fns[f"fast {name}"] = lambda x=x: segments(lambda _: fast_decision(steerer, x, floor))[0]
    med, _ = medians(fns, repeats)
    block_ms = med["block"][0] * 1e3
    x0 = next(iter(outs.values()))
    sc = fast_gate.screen(steerer._derived(x0.device, x0.dtype)[0], steerer.harmful)
    cascade = " → ".join(f"{s.h} harmful + {s.m} probe rows" for s in sc.stages())
    print(f"\ngate cost: exact (full TopK encode of every token) vs fast (cascade of screens: {cascade}, each on "
          f"the tokens the one before lets through; full encode where the gate may pass), τ={tau} × unit "
          f"{steerer.gate_scale:g}; share = gate time / unsteered block ({block_ms:.1f} ms), median of {repeats}; "
          "goal for the fast gate ≤ 5 %")
    print(f"{'input':<10}{'exact ms':>10}{'share':>8}{'fast ms':>10}{'share':>8}{'speed-up':>10}{'screened':>10}"
          f"{'agree':>9}{'missed':>8}")
    rows, ok = [], True
    for name, x in outs.items():
        e_ms, f_ms = med[f"exact {name}"][0] * 1e3, med[f"fast {name}"][0] * 1e3
        ag = agreement(steerer, x, floor, steerer.gate_scale)
        ok &= ag["agree"] >= 0.99 and ag["missed_above_2_units"] == 0
        rows.append({"input": name, "exact_ms": e_ms, "fast_ms": f_ms, "exact_share": e_ms / block_ms,
                     "fast_share": f_ms / block_ms, **ag})
        print(f"{name:<10}{e_ms:>10.1f}{e_ms / block_ms:>8.1%}{f_ms:>10.1f}{f_ms / block_ms:>8.1%}"
              f"{e_ms / f_ms:>9.1f}x{ag['screened']:>10.1%}{ag['agree']:>9.2%}{ag['missed_above_2_units']:>8}  "
              f"{'ok' if f_ms / block_ms <= 0.05 else 'ABOVE 5 %'}")
    parts = fast_parts(steerer, outs["safe"], floor, repeats, block_ms) if "safe" in outs else {}
    testbed = testbed_agreement(testbed_prompts) if testbed_prompts else []
    for r in testbed:
        ok &= r["agree"] >= 0.99 and r["missed_above_2_units"] == 0
    print(f"gate agreement: {'yes' if ok else 'NO'} (≥ 99 % of tokens, no token missed above 2 gate units)")
    return {"block_ms": block_ms, "planted": rows, "parts": parts, "testbed": testbed, "agree": ok,
            "stages": [int(s.m) for s in sc.stages()]}


def fast_parts(steerer: PositionSteerer, x: torch.Tensor, floor: float, repeats: int, block_ms: float) -> dict:
    """Where the fast gate's time goes on tokens x: each stage of its cascade on the tokens the stages before it let
    through (the product with the rows it adds and its bound; the gather of a stage's rows from the encoder also
    timed apart, as part of it), then the exact TopK code of the tokens left; each a median over `repeats` as a
    share of the block."""
    sae, lookup = steerer._derived(x.device, x.dtype)[:2]
    xs = sae.prepare(x.reshape(-1, x.shape[-1]))
    n = xs.shape[0]
    fns, tokens, rows_of = {}, {}, {}
    for i, (st, alive, xi, pre) in enumerate(fast_gate.screen(sae, steerer.harmful).walk(xs, sae.b_dec, floor)):
        if st is None:  # the tokens left for the exact code
            fns["exact codes"] = lambda alive=alive: segments(lambda _: steerer.harmful_codes(sae, xs[alive], lookup))[0]
            tokens["exact codes"], rows_of["exact codes"] = len(alive), sae.latents
            break
        name = "harmful rows" if i == 0 else f"probes to {st.m}"
        fns[name] = lambda st=st, xi=xi, pi=pre: segments(lambda _: st.mass_bound(xi, st.extend(xi, pi)))[0]
        tokens[name], rows_of[name] = len(alive), len(st.added)
        if st.W is None:
            fns[f"  its gather ({name})"] = lambda st=st: segments(lambda _: st.added_rows())[0]
            tokens[f"  its gather ({name})"], rows_of[f"  its gather ({name})"] = len(alive), len(st.added)
    med, _ = medians(fns, repeats)
    print("fast gate parts on the safe input (share of the block; the encoder rows each part multiplies by):")
    out = {}
    for name in fns:
        ms = med[name][0] * 1e3
        out[name.strip()] = {"ms": ms, "share": ms / block_ms, "tokens": tokens[name], "rows": rows_of[name]}
        print(f"  {name:<30}{ms:>9.1f} ms{ms / block_ms:>8.1%}  {tokens[name]:>6} of {n} tokens × {rows_of[name]} rows")
    return out


def testbed_agreement(n_prompts: int, steps: int = 4) -> list[dict]:
    """The fast vs exact gate on the committed testbed DiT's own activations at its committed dictionary's
    positions (τ = 1 per token; per image, the flags of each image row)."""
    from safedig_core.formats.dictionary import load
    from safedig_core.testbed import world
    from safedig_core.testbed.dictionary import PATH
    from safedig_core.testbed.model import generate, load_testbed

    d = load(PATH)
    model, encode_fn = load_testbed()
    rows = world.prompt_sets(0)["eval"]
    rows = [rows[i] for i in torch.linspace(0, len(rows) - 1, n_prompts).round().long().tolist()]
    acts = {p: [] for p in d.entries}
    rec = comfyui.recording_model(model, list(d.entries), lambda p, x, to: acts[p].append(x.float().clone()))
    generate(rec, encode_fn, [r["prompt"] for r in rows], [r["seed"] for r in rows], steps=steps)
    unsafe = sum(r["label"] == "unsafe" for r in rows)
    print(f"testbed activations: {len(rows)} prompts ({unsafe} unsafe), {steps} steps, cond and uncond rows; "
          "committed testbed dictionary, τ = 1")
    print(f"{'position':<14}{'latents':>8}{'tokens':>8}{'exact pass':>11}{'harmful rows':>13}{'screened':>10}"
          f"{'agree':>9}{'missed':>8}{'images':>8}{'flags agree':>12}  (harmful rows: left after the first stage)")
    out = []
    for p, e in d.entries.items():
        st = e.steerer()
        x = torch.cat(acts[p])
        ag = agreement(st, x, st.gate_scale, st.gate_scale)
        cfg = SteeringConfig(repel=1.0, threshold=1.0, gate="image")
        flags = float((st.flag_images(x, cfg) == st.flag_images(x, cfg.with_(fast_gate=True))).float().mean())
        out.append({"position": str(p), "latents": e.sae.latents, **ag, "images": x.shape[0], "image_flags_agree": flags})
        print(f"{str(p):<14}{e.sae.latents:>8}{ag['tokens']:>8}{ag['exact_pass']:>11.1%}{ag['after_harmful_rows']:>13.1%}"
              f"{ag['screened']:>10.1%}"
              f"{ag['agree']:>9.2%}{ag['missed_above_2_units']:>8}{x.shape[0]:>8}{flags:>12.2%}")
        out[-1]["agree"] = min(ag["agree"], flags)
    return out


if __name__ == "__main__":
    sys.exit(main())
