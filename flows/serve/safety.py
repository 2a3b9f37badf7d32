"""The last image stage: the image safety check (when configured), the invisible watermark,
PNG. Its checker is the video decode stage's too (video_stages.py)."""

from __future__ import annotations

import asyncio
import io
import time
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from ray import serve

from actors.watermark import embed_watermark
from flows.serve.messages import FinishedImages, Staged
from flows.serve.replica import deployment_name, local_bundle, torch_dtype
from schemas.config import SafetyConfig, StorageConfig

if TYPE_CHECKING:
    from actors.safety import ImageSafetyChecker


def image_checker(safety: SafetyConfig, storage: StorageConfig) -> ImageSafetyChecker | None:
    """The configured image classifier, shared by image and video outputs; None: no check."""
    if safety.image_checker is None:
        return None
    # Imported here: transformers costs a replica seconds to import, and a stage without a
    # checker (only the watermark and the PNG) never needs it.
    from actors.safety import ImageSafetyChecker

    return ImageSafetyChecker(
        local_bundle(safety.image_checker, storage),
        safety.max_nsfw_score,
        device=safety.image_checker.device,
        dtype=torch_dtype(safety.image_checker),
    )


@serve.deployment
class SafetyStage:
    """The last stage: image safety check (when configured), invisible watermark, PNG."""

    def __init__(self, safety: SafetyConfig, storage: StorageConfig) -> None:
        self.name = deployment_name()
        self.watermark_key = safety.watermark_key
        self.checker = image_checker(safety, storage)
        self.num_requests = 0

    async def finish(self, images: Staged) -> Staged:
        """``FinishedImages`` of the uint8 images."""
        start = time.perf_counter()
        self.num_requests += 1
        finished = await asyncio.to_thread(self._finish, images.value)
        return Staged.after(finished, (images,), self.name, start)

    def _finish(self, images: list[np.ndarray]) -> FinishedImages:
        flagged = [False] * len(images)
        if self.checker is not None:
            images, flagged = self.checker.check(images)
        pngs = [_png(embed_watermark(image, self.watermark_key)) for image in images]
        return FinishedImages(pngs, flagged)

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
