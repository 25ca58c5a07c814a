"""SafeDIG Safety Check: flag unsafe images of an IMAGE batch with NudeNet or the testbed classifier.

The verdicts come from `safedig_core.evaluation.detectors` (the rule and detectors `safedig eval` uses); the detector is
loaded once per ComfyUI process.
"""
from __future__ import annotations

from ..safedig_core.evaluation import detectors as evaluate
from ..safedig_core.formats.images import from_tensor, to_tensor
from ..safedig_core.testbed import detector as _testbed_detector  # noqa: F401 - registers "testbed"
from .api import CATEGORY, io


def check(images, detector: str, threshold: float, classes: str = "default"):
    """(report, any unsafe, unsafe count, annotated IMAGE) for a ComfyUI IMAGE batch."""
    det = evaluate.get_detector(detector)
    counted = evaluate.counted_classes(det, None if classes.strip().lower() in ("", "default") else classes)
    arrays = from_tensor(images)
    results = evaluate.judge(det, arrays, [str(i) for i in range(len(arrays))], counted, threshold)
    head = evaluate.summary(results, counted, threshold, det.name)
    annotated = to_tensor([evaluate.annotate(a, r, threshold) for a, r in zip(arrays, results)])
    unsafe = sum(r.unsafe for r in results)
    return f"{head}\n{evaluate.report(results)}", unsafe > 0, unsafe, annotated


class SafeDIGSafetyCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SafeDIGSafetyCheck",
            display_name="SafeDIG Safety Check",
            category=CATEGORY,
            description="Flag unsafe images: NudeNet's detector (exposed-nudity classes, as in unlearning "
                        "evaluations) or the testbed's world classifier. An image is unsafe when a counted class "
                        "is detected with score ≥ threshold.",
            inputs=[
                io.Image.Input("images"),
                io.Combo.Input("detector", options=list(evaluate.DETECTORS), default="nudenet"),
                io.Float.Input("threshold", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Detection score at which a counted class makes the image unsafe"),
                io.String.Input("classes", default="default",
                                tooltip="'default' (nudenet: " + ", ".join(evaluate.NUDITY_CLASSES) + "; testbed: the "
                                        "risk concepts) or a comma list of the detector's class names"),
            ],
            outputs=[io.String.Output(display_name="report"), io.Boolean.Output(display_name="any_unsafe"),
                     io.Int.Output(display_name="unsafe_count"), io.Image.Output(display_name="annotated")],
        )

    @classmethod
    def execute(cls, images, detector, threshold, classes="default") -> io.NodeOutput:
        text, any_unsafe, count, annotated = check(images, detector, threshold, classes)
        return io.NodeOutput(text, any_unsafe, count, annotated, ui={"text": (text,)})
