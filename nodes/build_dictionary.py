"""SafeDIG Build Dictionary: route → train → adapt over an activation store, saved into `models/sae/`.

Same code path as `safedig build` (`safedig_core.pipeline.build.build`). The work folder sits next to the output
file (`models/sae/<name>.work/`), so running the node again after an interruption resumes training from
its checkpoints.
"""
from __future__ import annotations

import os

import comfy.model_management
import comfy.utils
import folder_paths

from ..safedig_core.formats.dictionary import load, summary
from ..safedig_core.formats.store import ActivationStore
from ..safedig_core.pipeline.adapt import AdaptConfig
from ..safedig_core.pipeline.build import BuildConfig, build
from ..safedig_core.pipeline.train import TrainConfig
from .api import CATEGORY, io
from .collect_activations import store_path
from .load_dictionary import FOLDER


class SafeDIGBuildDictionary(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGBuildDictionary",
            display_name="SafeDIG Build Dictionary",
            category=CATEGORY,
            description="Build a safety dictionary from a collected activation store: rank positions by how well "
                        "their harmful signal transfers across risks, train a sparse autoencoder per routed "
                        "position, find its harmful latents, adapt its decoder to the target domain.",
            is_output_node=True,
            inputs=[
                io.String.Input("store", default="my_store",
                                tooltip="Output name given to SafeDIG Collect Activations, or a store folder path"),
                io.String.Input("dictionary_name", default="my_dictionary",
                                tooltip="File name in models/sae/ (.safetensors is added)"),
                io.Int.Input("routed_positions", default=3, min=1, max=16,
                             tooltip="How many positions routing picks to train an SAE at (top K by routing score)"),
                io.Int.Input("train_steps", default=10000, min=10, max=1_000_000),
                io.Int.Input("adapt_steps", default=1000, min=0, max=1_000_000,
                             tooltip="Decoder adaptation steps on the store's target domain (0: none)"),
                io.Int.Input("expansion", default=16, min=1, max=128, tooltip="Latents per activation dimension"),
                io.Int.Input("k", default=32, min=1, max=1024, tooltip="Active latents per token (TopK)"),
                io.Int.Input("batch_size", default=4096, min=16, max=65536),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, store, dictionary_name, routed_positions, train_steps, adapt_steps, expansion, k, batch_size,
                seed) -> io.NodeOutput:
        path = store if os.path.isdir(store) else store_path(store)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"activation store {store!r} not found (looked for {path})")
        name = dictionary_name.strip()
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise ValueError(f"dictionary name {dictionary_name!r}: a plain file name, no folders")
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        out = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name)
        cfg = BuildConfig(top_k=routed_positions,
                          train=TrainConfig(expansion=expansion, k=k, steps=train_steps, batch_size=batch_size, seed=seed),
                          adapt=AdaptConfig(steps=adapt_steps, batch_size=batch_size, seed=seed) if adapt_steps else None)
        bar = comfy.utils.ProgressBar(routed_positions * (train_steps + adapt_steps))

        def should_stop() -> bool:  # polled once per optimisation step: it also advances the bar
            bar.update(1)
            return comfy.model_management.processing_interrupted()

        try:
            result = build(ActivationStore(path), out, cfg, progress=False, should_stop=should_stop,
                           device=comfy.model_management.get_torch_device())
        except KeyboardInterrupt:  # training stopped cleanly after writing its checkpoint: report it as ComfyUI does
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        return io.NodeOutput(summary(load(out), out) + f"\nrouted: {', '.join(result['positions'])}")
