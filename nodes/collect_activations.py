"""SafeDIG Collect Activations: record a MODEL's DiT activations over a prompt file into an activation store.

The node and `safedig collect` share `safedig_core.pipeline.collect.collect`; the node builds its runner from the
MODEL and CLIP sockets. Stores go to `<ComfyUI output>/safedig_activations/<output name>/` - not under
`models/sae/`, whose `.safetensors` files are listed as dictionaries by SafeDIG Load Dictionary (the
store's shards would appear there). The prompt file is a name in ComfyUI's input folder (`paths.py`); its
errors name the line and the problem, never the file's content. Running the node again with the same inputs resumes an interrupted
collection; a store made with other settings or prompts is refused.
"""
from __future__ import annotations

import os

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..safedig_core.adapters.comfy.families import latent_shape
from ..safedig_core.adapters.comfy.runner import ComfyRunner, clip_encoder, model_fingerprint
from ..safedig_core.adapters.comfy.runtime import layout_of
from ..safedig_core.formats.messages import quoted
from ..safedig_core.formats.prompts import PromptError, load_prompts
from ..safedig_core.formats.prompts import summary as prompt_summary
from ..safedig_core.formats.store import ActivationStore, summary
from ..safedig_core.pipeline import collect as core
from . import paths
from .api import CATEGORY, io


def read_prompts(prompt_file: str):
    """The prompt records of a file in ComfyUI's input folder; errors quote nothing from the file."""
    path = paths.input_file(prompt_file)
    try:
        return load_prompts(path)
    except PromptError as e:
        raise PromptError(f"prompt file {quoted(prompt_file.strip())}: {e.public}") from None


class SafeDIGCollectActivations(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGCollectActivations",
            display_name="SafeDIG Collect Activations",
            category=CATEGORY,
            description="Generate every prompt of a prompt file with this model and record DiT activations (token "
                        "samples and per-prompt means) at the chosen positions and sampler steps into an activation "
                        "store under output/safedig_activations/. Rerun to resume an interrupted collection.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.String.Input("prompt_file", default="prompts.csv",
                                tooltip="CSV / TSV / JSONL with prompt,label,category,domain[,seed], or the I2P CSV; "
                                        "a file in ComfyUI's input folder (subfolders allowed)"),
                io.String.Input("positions", default="all",
                                tooltip="'all' or a comma list, e.g. input.txt, input.pooled, double.7.img, single.12.img (FLUX) / joint.10.img (SD3)"),
                io.Int.Input("steps", default=28, min=1, max=1000, tooltip="Sampler steps per image"),
                io.Int.Input("seed", default=0, min=0, max=2 ** 63 - 1,
                             tooltip="Noise seed of prompt i is seed + i, unless the prompt file gives a seed"),
                io.Int.Input("token_budget", default=256, min=0, max=1 << 20,
                             tooltip="Token rows kept per image, position and recorded step (0: per-prompt means only)"),
                io.String.Input("record_steps", default="0.25,0.5,0.75",
                                tooltip="Steps to record: fractions of the schedule (0.25,0.5), indices (0,5,-1) or 'all'"),
                io.String.Input("output_name", default="activations",
                                tooltip="Store folder under output/safedig_activations/"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale: 1.0 for FLUX.1 Dev, about 4 for SD3.5"),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1, tooltip="FLUX guidance (ignored by SD3)"),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="simple"),
                io.Int.Input("width", default=1024, min=16, max=8192, step=16),
                io.Int.Input("height", default=1024, min=16, max=8192, step=16),
                io.String.Input("negative_prompt", default="", multiline=True, tooltip="Used when cfg > 1"),
                io.Combo.Input("dtype", options=["float16", "bfloat16"], default="float16",
                               tooltip="Storage precision of token rows (bfloat16 if float16 overflows)"),
            ],
            outputs=[io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, prompt_file, **kwargs):
        try:  # rerun when the prompt file changes (the store then refuses the new list, by design)
            st = os.stat(paths.input_file(prompt_file))
            return (prompt_file, st.st_mtime_ns, st.st_size)
        except (paths.PathRefused, OSError):
            return prompt_file

    @classmethod
    def execute(cls, model, clip, prompt_file, positions, steps, seed, token_budget, record_steps, output_name,
                cfg=1.0, guidance=3.5, sampler_name="euler", scheduler="simple", width=1024, height=1024,
                negative_prompt="", dtype="float16") -> io.NodeOutput:
        prompts = read_prompts(prompt_file)
        path = paths.store_dir(output_name, what="output name")
        family = layout_of(model).family
        runner = ComfyRunner(model, clip_encoder(clip, family, negative_prompt, guidance), cfg, sampler_name,
                             scheduler, latent_shape(model, width, height),
                             name=f"comfyui-model#{model_fingerprint(model)}")
        pbar = comfy.utils.ProgressBar(len(prompts))

        def progress(done: int, total: int) -> None:
            pbar.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        def should_stop() -> bool:
            comfy.model_management.throw_exception_if_processing_interrupted()  # raises: the store stays valid
            return False

        try:
            result = core.collect(runner, prompts, positions, path, steps, record_steps, token_budget, seed,
                                  progress=progress, should_stop=should_stop, dtype=dtype)
        except ValueError as e:  # the store's place named as output/..., not by the server's folders
            raise type(e)(str(e).replace(path, paths.display(path))) from None
        text = f"{summary(ActivationStore(path)).replace(path, paths.display(path))}\n  {prompt_summary(prompts)}\n  this run: {result.collected} " \
               f"prompts stored, {result.resumed} were already stored"
        return io.NodeOutput(text, ui={"text": (text,)})
