"""Steer FLUX.1 in diffusers with a SafeDIG dictionary: one image unsteered, one steered, same seed.

Needs the FLUX.1-dev weights (a Hugging Face login that accepted the licence, or a local copy) and a GPU:
    python scripts/diffusers_flux_example.py dict.safetensors "a prompt" --out out/flux
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safedig_core.adapters.diffusers.hooks import steer
from safedig_core.steering import SteeringConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dictionary")
    ap.add_argument("prompt")
    ap.add_argument("--model", default="black-forest-labs/FLUX.1-dev", help="hub id or local folder")
    ap.add_argument("--blend", type=float, default=1.0)
    ap.add_argument("--repel", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/diffusers_flux")
    args = ap.parse_args()

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    pipe.enable_model_cpu_offload()
    os.makedirs(args.out, exist_ok=True)
    cfg = SteeringConfig(blend=args.blend, repel=args.repel, threshold=args.threshold)

    def run():
        g = torch.Generator("cpu").manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=3.5, generator=g).images[0]

    run().save(os.path.join(args.out, "unsteered.png"))
    with steer(pipe.transformer, args.dictionary, cfg, schedule=pipe.scheduler):
        run().save(os.path.join(args.out, "steered.png"))
    print(f"wrote {args.out}/unsteered.png and {args.out}/steered.png")


if __name__ == "__main__":
    main()
