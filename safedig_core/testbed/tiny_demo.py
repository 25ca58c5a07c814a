"""`safedig tiny-demo`: the steering path end to end on a tiny random-weight FLUX in the real ComfyUI.

The smallest look at the mechanics, with nothing trained (the testbed demo, `safedig demo`, is the real
measurement): it records block outputs for an "unsafe" and a "safe" prompt, marks as harmful the SAE latents that fire more on the unsafe one, writes
a dictionary file, loads it through the Apply Steering node's code path and samples with KSampler,
printing what changed. The weights are random, so this shows the mechanics, not safety.
"""
from __future__ import annotations

import os
import time

import torch

from ..adapters.comfy import runtime as comfyui
from ..adapters.comfy.patches import SharedSteerers
from ..formats.dictionary import DictionaryEntry, SafetyDictionary, load, save, summary
from ..positions import parse
from ..sae import SparseAutoencoder
from ..steering import SteeringConfig

POSITIONS = ("double.1.img", "single.0.img", "single.0.txt")


def _record(model, names, cond, neg, seed):
    """Block outputs at `names` (cond half) for one sampling run, through the collection recorder."""
    seen = {n: [] for n in names}

    def record(p, x, to):
        seen[p.name].append(x[:1].reshape(-1, x.shape[-1]).clone())

    m = comfyui.recording_model(model, [parse(n) for n in names], record)
    comfyui.sample(m, cond, neg, torch.zeros(1, 16, 8, 8), seed=seed, steps=4)
    return {n: torch.cat(v) for n, v in seen.items()}


@torch.no_grad()
def run(out_dir: str = "out/tiny-demo", seed: int = 0) -> dict:
    t0 = time.time()
    comfyui.bootstrap()
    model = comfyui.tiny_flux(seed=seed)
    width = comfyui.layout_of(model).width
    g = torch.Generator().manual_seed(seed)

    def prompt():
        return comfyui.conditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, 768, generator=g), guidance=3.5)

    unsafe, safe, neg = prompt(), prompt(), comfyui.conditioning(torch.zeros(1, 8, 64), torch.zeros(1, 768), guidance=3.5)
    acts_u, acts_s = _record(model, POSITIONS, unsafe, neg, seed), _record(model, POSITIONS, safe, neg, seed)

    entries = {}
    for n in POSITIONS:
        p = parse(n)
        xu, xs = acts_u[n], acts_s[n]
        scale = (width / xs.pow(2).sum(-1).mean()).sqrt().item()
        sae = SparseAutoencoder.init_random(width, 8 * width, k=16, scale=scale, generator=g)
        zu, zs = sae.encode(xu).mean(0), sae.encode(xs).mean(0)
        score = zu - zs
        top = score.topk(6)
        keep = [(int(j), float(v)) for v, j in zip(top.values, top.indices) if v > 0]
        entries[p] = DictionaryEntry(p, sae, [j for j, _ in keep], [v for _, v in keep])
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tiny_flux_dictionary.safetensors")
    save(SafetyDictionary("flux", entries, {"blend": 1.0, "repel": 1.0}, {"made_by": "safedig tiny-demo", "seed": seed}), path)
    d = load(path)
    print(summary(d, path))

    store = SharedSteerers({p: e.steerer() for p, e in d.entries.items()})
    rows = []
    for label, cfg in (("blend+repel", SteeringConfig(blend=1.0, repel=1.0)), ("identity a=b=0", SteeringConfig())):
        steered = comfyui.steer_model(model, store, d.positions, cfg)
        for name, cond in (("unsafe", unsafe), ("safe", safe)):
            base = comfyui.sample(model, cond, neg, torch.zeros(1, 16, 8, 8), seed=seed, steps=4)
            out = comfyui.sample(steered, cond, neg, torch.zeros(1, 16, 8, 8), seed=seed, steps=4)
            mass = {n: float(store.steerers[parse(n)].harmful_mass((acts_u if name == "unsafe" else acts_s)[n]).mean())
                    for n in POSITIONS}
            rows.append({"config": label, "prompt": name, "mean_abs_change": float((out - base).abs().mean()),
                         "relative_change": float((out - base).norm() / base.norm()), "bit_identical": bool(torch.equal(out, base)),
                         "harmful_mass": mass})
    print(f"\n{'config':<16}{'prompt':<8}{'mean |Δ latent|':>17}{'rel. change':>13}  bit-identical  harmful mass per position")
    for r in rows:
        masses = " ".join(f"{k}={v:.2f}" for k, v in r["harmful_mass"].items())
        print(f"{r['config']:<16}{r['prompt']:<8}{r['mean_abs_change']:>17.5f}{r['relative_change']:>13.4f}  {str(r['bit_identical']):<13}  {masses}")
    print(f"\ndictionary: {path}\nseconds: {time.time() - t0:.1f}")
    return {"rows": rows, "dictionary": path}
