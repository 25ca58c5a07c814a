"""SafeDIG Build Dictionary: route → train → adapt over an activation store, saved into `models/sae/`.

Same code path as `safedig build` (`safedig_core.pipeline.build.build`), which trains with inference mode
off (ComfyUI runs every node under `torch.inference_mode()`). The store is an output name of SafeDIG
Collect Activations; the work folder is `output/safedig_builds/<name>.work/`, outside `models/sae/` so
that its checkpoints never appear in the Load Dictionary list. Running the node again after an interruption
resumes from it (the summary says from which step); a work folder of another store or other settings is
refused. An existing dictionary is replaced only with `overwrite` on.
"""
from __future__ import annotations

import comfy.model_management
import comfy.utils

from ..safedig_core.formats.dictionary import load, summary
from ..safedig_core.formats.store import ActivationStore
from ..safedig_core.pipeline.adapt import AdaptConfig
from ..safedig_core.pipeline.build import BuildConfig, build
from ..safedig_core.pipeline.train import TrainConfig
from . import paths
from .api import CATEGORY, io
from .load_dictionary import FOLDER


def _public(e: Exception, *folders: str) -> Exception:
    """The same error with the server's folders shown as output/... names."""
    text = str(e)
    for f in folders:
        text = text.replace(f, paths.display(f))
    return type(e)(text) if isinstance(e, ValueError) else e


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
                io.String.Input("store", default="activations",
                                tooltip="The output name given to SafeDIG Collect Activations "
                                        "(a store in output/safedig_activations/)"),
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
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a dictionary of the same name in models/sae/ (off: refuse)"),
            ],
            outputs=[io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, store, dictionary_name, routed_positions, train_steps, adapt_steps, expansion, k, batch_size,
                seed, overwrite=False) -> io.NodeOutput:
        path = paths.store_dir(store, must_exist=True)
        name, out = paths.dictionary_target(FOLDER, dictionary_name)
        work = paths.work_dir(name)
        cfg = BuildConfig(top_k=routed_positions,
                          train=TrainConfig(expansion=expansion, k=k, steps=train_steps, batch_size=batch_size, seed=seed),
                          adapt=AdaptConfig(steps=adapt_steps, batch_size=batch_size, seed=seed) if adapt_steps else None)
        bar = comfy.utils.ProgressBar(routed_positions * (train_steps + adapt_steps))

        def should_stop() -> bool:  # polled once per optimisation step: it also advances the bar
            bar.update(1)
            return comfy.model_management.processing_interrupted()

        try:
            result = build(ActivationStore(path), out, cfg, work, progress=False, should_stop=should_stop,
                           device=comfy.model_management.get_torch_device(), overwrite=overwrite)
        except KeyboardInterrupt:  # training stopped cleanly after writing its checkpoint: report it as ComfyUI does
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise
        except ValueError as e:
            raise _public(e, path, work) from None
        text = summary(load(out), name) + f"\nrouted: {', '.join(result['positions'])}"
        resumed = {p: m["resumed_from"] for p, m in result["trained"].items() if m.get("resumed_from")}
        if resumed:
            text += "\nresumed training from " + ", ".join(f"{p} step {s}" for p, s in resumed.items())
        text += f"\nwork folder: {paths.display(work)}"
        return io.NodeOutput(text, ui={"text": (text,)})
