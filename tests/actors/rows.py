"""Rows as the decode stage hands them to the model stages, drawn from a seed in the tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas.shards import BucketKey


def image_pixels(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random colour field: (H, W, 3) uint8."""
    rng = np.random.RandomState(seed)
    corners = rng.randint(0, 256, (2, 2, 3)).astype(np.float32)
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    field = top * (1 - ys) + bottom * ys + rng.normal(0, 8, (height, width, 3))
    return np.clip(field, 0, 255).astype(np.uint8)


def clip_pixels(num_frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """A clip whose frames change from one colour field to another: (F, H, W, 3) uint8."""
    start, end = image_pixels(width, height, seed), image_pixels(width, height, seed + 1)
    weights = np.linspace(0, 1, num_frames)[:, None, None, None]
    return (start * (1 - weights) + end * weights).astype(np.uint8)


def decoded_row(
    sample_id: str,
    pixels: np.ndarray,
    caption: str | None = "a red circle on a blue background",
    original_size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """An ok row of an image, ``pixels`` (H, W, 3), or a clip, (F, H, W, 3). Like decode, it
    stores an image as one frame, (1, H, W, 3). ``original_size`` (height, width) defaults to
    the pixels' own size."""
    media_kind = "video" if pixels.ndim == 4 else "image"
    height, width = pixels.shape[-3:-1]
    original_height, original_width = original_size or (height, width)
    frames = None if media_kind == "image" else len(pixels)
    bucket = str(BucketKey(height=int(height), width=int(width), num_frames=frames))
    return {
        "sample_id": sample_id,
        "source_uri": f"file:///corpus/{sample_id}",
        "media_kind": media_kind,
        "caption_original": caption,
        "pixels": pixels if media_kind == "video" else pixels[None],
        "original_height": np.int32(original_height),
        "original_width": np.int32(original_width),
        "crop_box": np.array([0, 0, original_height, original_width], dtype=np.int32),
        "bucket": bucket,
        "status": "ok",
        "reason": "",
        "detail": "",
    }


def quarantined_row(sample_id: str, media_kind: str = "image") -> dict[str, Any]:
    """A row decode gave up on, with decode's empty pixels (no frames)."""
    return {
        "sample_id": sample_id,
        "source_uri": f"file:///corpus/{sample_id}",
        "media_kind": media_kind,
        "caption_original": "a broken file",
        "pixels": np.zeros((0, 0, 0, 3), dtype=np.uint8),
        "original_height": np.int32(0),
        "original_width": np.int32(0),
        "crop_box": np.zeros(4, dtype=np.int32),
        "bucket": "",
        "status": "quarantined",
        "reason": "truncated",
        "detail": "image file is truncated",
    }
