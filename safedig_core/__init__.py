"""SafeDIG core: steer text-to-image DiTs away from unsafe content through sparse autoencoder dictionaries,
usable without ComfyUI.

The maths lives at the top of the package: `positions` (where a DiT is read and steered), `sae` (the TopK
sparse autoencoder), `steering` (Blend and Repel), `schedule` (where a model call sits in the sampler). Above
it, in layers that import only downwards (docs/ARCHITECTURE.md): `formats/`, `pipeline/` and `convert/`,
`evaluation/`, `adapters/comfy` and `adapters/diffusers`, `testbed/`, `cli/`.
"""
