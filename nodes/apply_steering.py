"""SafeDIG Apply Steering: a clone of the MODEL whose routed DiT blocks steer through the dictionary."""
from __future__ import annotations

from ..safedig_core.adapters.comfy.runtime import layout_of, steer_model
from ..safedig_core.gate import plan
from ..safedig_core.positions import parse_list
from ..safedig_core.steering import APPLY_TO, SteeringConfig
from .api import CATEGORY, DICTIONARY, io

GATES = {"per token": "token", "per image": "image"}
DETECT_AT = {"each position": "each", "text positions": "text", "image positions": "img"}


def apply(model, loaded, cfg: SteeringConfig, positions: str = "all"):
    """Check the dictionary against the model, then clone it with the steering patches installed."""
    d = loaded.dictionary
    layout = layout_of(model)
    chosen = parse_list(positions, d.positions)
    d.check_layout(layout, plan(cfg, chosen, d.positions).positions, source=f"safety dictionary {loaded.name}")
    return steer_model(model, loaded.store, chosen, cfg, layout)


def config(blend, repel, threshold, start_percent, end_percent, apply_to, preserve_norm, gate="per token",
           detect_at="each position", fast_gate=False, focus=0.0) -> SteeringConfig:
    """The node's widgets as a SteeringConfig; `detect_at` and `focus` only mean something to the per-image gate."""
    g = GATES[gate]
    return SteeringConfig(blend=blend, repel=repel, threshold=threshold, start=start_percent, end=end_percent,
                          apply_to=apply_to, preserve_norm=preserve_norm, gate=g,
                          detect=DETECT_AT[detect_at] if g == "image" else "each", fast_gate=bool(fast_gate),
                          focus=focus if g == "image" else 0.0)


class SafeDIGApplySteering(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGApplySteering",
            display_name="SafeDIG Apply Steering",
            category=CATEGORY,
            description="Steer a FLUX or SD3 model away from unsafe content: Blend moves gated tokens toward the "
                        "dictionary's safe reconstruction, Repel pushes them off the harmful sparse directions.",
            inputs=[
                io.Model.Input("model"),
                DICTIONARY.Input("dictionary"),
                io.Float.Input("blend", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="α: how far gated tokens move toward the safe reconstruction"),
                io.Float.Input("repel", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="β: how far gated tokens move against their harmful directions (>1 overshoots)"),
                io.Float.Input("threshold", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="τ: steer only tokens whose harmful mass exceeds τ × the dictionary's gate "
                                       "unit (1 = more than 99% of safe tokens reach, for dictionaries made by "
                                       "SafeDIG; 0 = any harmful activity); under the per-image gate, images "
                                       "whose strongest token exceeds τ × the per-image unit (1 = more than "
                                       "99% of safe images reach)"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the window, as a fraction of the sampler's steps"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the window (exclusive; 1.0 includes the last step)"),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="both",
                               tooltip="Which batch halves to steer: the prompt (cond), the negative (uncond) or both"),
                io.String.Input("positions", default="all",
                                tooltip="'all', 'txt' (every text-stream position, the pooled text vector "
                                        "included: what the testbed demo steers), 'img', or a comma list of the "
                                        "dictionary's positions, e.g. double.7.img, single.12.img"),
                io.Boolean.Input("preserve_norm", default=False,
                                 tooltip="Rescale each steered token to its original norm"),
                io.Combo.Input("gate", options=list(GATES), default="per token", optional=True,
                               tooltip="per token: steer each token whose own harmful mass exceeds τ. per image: "
                                       "decide once per image from its prompt (cond) rows: when their strongest "
                                       "token exceeds τ × the dictionary's per-image unit, steer every token of the "
                                       "image that carries harmful activity (its negative half too, as apply_to "
                                       "allows). Per image with text positions is what the testbed demo measures"),
                io.Combo.Input("detect_at", options=list(DETECT_AT), default="each position", optional=True,
                               tooltip="Per-image gate only: where the decision is made. each position: every "
                                       "position decides for itself. text/image positions: the steered text "
                                       "(or image) stream block positions decide, and every steered position of "
                                       "the same model call follows (the model's inputs, e.g. input.pooled, run "
                                       "first and take the previous step's decision); block positions before "
                                       "the first of them are refused"),
                io.Boolean.Input("fast_gate", default=False, optional=True,
                                 tooltip="Screen each token on the harmful latents first and run the full "
                                         "dictionary encode only where the gate may pass: the same decisions "
                                         "and images as the exact gate, at a fraction of its cost on safe tokens"),
                io.Float.Input("focus", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Per-image gate only: in a flagged image, steer only the tokens whose harmful "
                                       "mass is at least this share of the image's largest at that position, so a "
                                       "safe object beside a risky one is touched less. 0: every token with "
                                       "harmful activity; the testbed demo measures 0.5"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, dictionary, blend, repel, threshold, start_percent, end_percent, apply_to,
                positions, preserve_norm, gate="per token", detect_at="each position", fast_gate=False,
                focus=0.0) -> io.NodeOutput:
        cfg = config(blend, repel, threshold, start_percent, end_percent, apply_to, preserve_norm, gate, detect_at,
                     fast_gate, focus)
        return io.NodeOutput(apply(model, dictionary, cfg, positions))
