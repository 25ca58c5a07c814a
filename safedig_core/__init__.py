"""SafeDIG core: positions, safety dictionaries and steering maths, usable without ComfyUI."""
