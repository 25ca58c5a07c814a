"""SafeDIG Feature Map: sample like KSampler while recording where the dictionary's harmful latents fire, then
decode and overlay the per-position harmful mass on the image.

It samples itself (rather than sitting after a KSampler) because ComfyUI runs each node once, in graph order:
the recording has to be installed in the sampling run it measures. The maths and the rendering live in
`safedig_core.adapters.comfy.feature_map`; KSampler's progress bar comes from `nodes.common_ksampler`.
"""
from __future__ import annotations

import comfy.samplers

from ..safedig_core.adapters.comfy import feature_map as core
from ..safedig_core.adapters.comfy.runtime import layout_of
from ..safedig_core.formats.images import from_tensor, to_tensor
from ..safedig_core.positions import parse_list
from .api import CATEGORY, DICTIONARY, io


def run(model, loaded, positive, negative, latent, vae, seed, steps, cfg, sampler_name, scheduler, positions="all",
        start_percent=0.0, end_percent=1.0, denoise=1.0):
    """(LATENT, IMAGE, heatmap IMAGE [B·P], summary) for the node; also what its tests call."""
    d = loaded.dictionary
    chosen = parse_list(positions, d.positions)
    if positions.strip().lower() in ("", "all"):
        chosen = [p for p in chosen if p.stream == "img"]  # text streams have no place on the image
    d.check_layout(layout_of(model), chosen,
                   source=f"safety dictionary {loaded.name}")
    out, maps = core.sample_maps(model, loaded.store.steerers, chosen, positive, negative, latent, seed, steps, cfg,
                                 sampler_name, scheduler, start_percent, end_percent, denoise)
    images = vae.decode(out["samples"])
    if images.ndim == 5:  # video VAEs: frames along the batch, as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    arrays = from_tensor(images)
    batch = next(iter(maps.values())).shape[0]
    panels = [p for i, a in enumerate(arrays[:batch]) for p in core.render(a, maps, i)]
    return out, images, to_tensor(panels), core.summary(maps)


class SafeDIGFeatureMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGFeatureMap",
            display_name="SafeDIG Feature Map",
            category=CATEGORY,
            description="Sample (as KSampler) while measuring the dictionary's harmful mass on every image token at "
                        "each position, averaged over the sampler steps in the window; returns the latent, the decoded "
                        "image and one heatmap overlay per position (in gate units: 1 = the steering gate at τ = 1).",
            inputs=[
                io.Model.Input("model"),
                DICTIONARY.Input("dictionary"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Vae.Input("vae"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple"),
                io.String.Input("positions", default="all",
                                tooltip="'all' or a comma list of the dictionary's positions, e.g. double.7.img"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Average the steps from this fraction of the schedule"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="...up to this one (exclusive; 1.0 includes the last step)"),
            ],
            outputs=[io.Latent.Output(), io.Image.Output(display_name="image"),
                     io.Image.Output(display_name="heatmaps"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, model, dictionary, positive, negative, latent_image, vae, seed, steps, cfg, sampler_name,
                scheduler, positions="all", start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        out, images, heatmaps, text = run(model, dictionary, positive, negative, latent_image, vae, seed, steps, cfg,
                                          sampler_name, scheduler, positions, start_percent, end_percent)
        return io.NodeOutput(out, images, heatmaps, text, ui={"text": (text,)})
