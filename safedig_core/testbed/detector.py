"""The testbed's world classifier as a detector of `evaluation.detectors` (`safedig eval --detector testbed`, the
Safety Check node): an image is flagged when the classifier sees a risk concept in it."""
from __future__ import annotations

import numpy as np

from ..evaluation.detectors import register
from ..formats.images import ImageError
from . import classifier, world


class Testbed:
    name = "testbed"
    default_threshold = 0.0

    def __init__(self):
        self._classifier = classifier
        self.labels = tuple(classifier.CLASSES)
        self.default_classes = tuple(c.name for c in world.CONCEPTS if c.label == "unsafe")
        self.size = world.SIZE

    def detect(self, images: list[np.ndarray]) -> list[list[dict]]:
        import torch

        for img in images:
            h, w = img.shape[:2]
            if h != w:
                raise ImageError(f"the testbed classifier reads square {self.size}×{self.size} renders; this image "
                                 f"is {w}×{h} (square images of other sizes are resized)")
        if not images:
            return []
        x = torch.stack([torch.tensor(img).permute(2, 0, 1).float().div(255) for img in images])
        pred = self._classifier.predict(x)  # resizes other square sizes to 32×32 (area)
        return [[{"class": c, "score": round(float(p), 6)}] for c, p in zip(pred["concept"], pred["confidence"])]


register("testbed", Testbed)
