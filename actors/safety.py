"""The serving graph's model-side safety parts (the prompt filter, which runs before any
model, is ``actors/prompt_filter.py``): an image safety check after decode, of images and of
every video frame. The invisible watermark served images and frames carry is
``actors/watermark.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

# The label whose probability an NSFW classifier reports, as Falconsai/nsfw_image_detection
# and similar ViT classifiers name it in id2label.
NSFW_LABEL = "nsfw"


class ImageSafetyChecker:
    """An image-classification bundle with an "nsfw" label, as diffusers' safety checker is
    used: an image scoring above ``max_nsfw_score`` is replaced by a black one."""

    def __init__(
        self,
        bundle_dir: str | Path,
        max_nsfw_score: float,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = (
            AutoModelForImageClassification.from_pretrained(bundle_dir, dtype=dtype)
            .to(device)
            .eval()
        )
        self.processor = AutoImageProcessor.from_pretrained(bundle_dir)
        labels = self.model.config.id2label
        matches = [index for index, label in labels.items() if label.lower() == NSFW_LABEL]
        if len(matches) != 1:
            raise ValueError(
                f"safety checker {bundle_dir}: expected one label named {NSFW_LABEL!r} in "
                f"id2label, got {labels}"
            )
        self.nsfw_index = int(matches[0])
        self.max_nsfw_score = max_nsfw_score

    def scores(self, images: Sequence[np.ndarray]) -> list[float]:
        """The "nsfw" probability of each (H, W, 3) uint8 image."""
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.model.device)
        with torch.inference_mode():
            logits = self.model(pixel_values=inputs["pixel_values"].to(self.model.dtype)).logits
        return logits.float().softmax(dim=-1)[:, self.nsfw_index].cpu().tolist()  # (B,)

    def check(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
        """The images with flagged ones blacked out, and which were flagged."""
        flagged = [score > self.max_nsfw_score for score in self.scores(images)]
        safe = [
            np.zeros_like(image) if bad else image
            for image, bad in zip(images, flagged, strict=True)
        ]
        return safe, flagged

    def check_video(self, frames: np.ndarray) -> tuple[np.ndarray, bool]:
        """The frames (F, H, W, 3) uint8, or black ones when any frame scores above the
        threshold, and whether one did. The whole video goes: the frames around a flagged one
        show nearly the same."""
        flagged = max(self.scores(list(frames))) > self.max_nsfw_score
        return (np.zeros_like(frames) if flagged else frames), flagged
