"""The second prep stage: decode and validate media, split videos into clips, bucket and crop.

Images go through PIL, videos through PyAV; both land in the same SDXL-style aspect-ratio
buckets (``BucketConfig``), resized to cover the bucket and center-cropped. The crop is
deterministic (resume relies on it) and recorded in original pixels, with the original
size, as the conditioning columns SDXL trains with. Bad input becomes a quarantined row.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps

from actors.batches import object_column, optional_text
from actors.sources import IMAGE_FORMATS, Quarantine
from schemas.config import BucketConfig, DecodeConfig
from schemas.errors import RaygenError
from schemas.shards import BucketKey

# PIL's convert("RGB") clips these 16-bit modes at 255 instead of scaling them. "I" (32-bit
# int) is the mode PIL's readers give 16-bit files too (PGM/PPM, some TIFFs).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
EMPTY_PIXELS = np.zeros((0, 0, 0, 3), dtype=np.uint8)  # (F, H, W, 3) with nothing in it

# Columns MediaDecoder makes; every input column but `data` (source_uri, item_uri,
# item_sources, media_kind, caption_original, ...) rides along with each output row.
DECODE_COLUMNS = (
    "sample_id",  # the input's; a video clip's is f"{sample_id}-c{k}"
    "source_rows",  # int32: rows this source_uri gave (a video's clips; else 1)
    "pixels",  # uint8 (F, H, W, 3): F=1 for an image; (0, 0, 0, 3) when quarantined
    "original_height",  # int32, after EXIF rotation; 0 when quarantined
    "original_width",  # int32
    "crop_box",  # int32 (4,): (top, left, height, width) in original pixels
    "bucket",  # str(BucketKey): "HxW" for an image, "FxHxW" for a clip; "" when quarantined
    "status",  # "ok" | "quarantined"
    "reason",  # "" or one of QUARANTINE_REASONS
    "detail",  # "" or why, for a person
)


def buckets(config: BucketConfig) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution**2`` pixels, sides multiples of
    ``step``, aspect ratio at most ``max_aspect`` either way; sorted."""
    if config.step is None:
        raise RaygenError(
            "buckets.step: null, which prep sets from the bundles when it starts "
            "(flows.prep.preflight); give a step to bucket without them"
        )
    area = config.resolution**2
    found: set[tuple[int, int]] = set()
    for short in range(config.step, config.resolution + 1, config.step):
        long = round(area / short / config.step) * config.step
        if long / short <= config.max_aspect:
            found |= {(long, short), (short, long)}
    if not found:
        raise RaygenError(
            f"buckets: no bucket of about {config.resolution}**2 pixels with sides a multiple "
            f"of step {config.step} and aspect at most {config.max_aspect}"
        )
    return sorted(found)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio (in log space, so 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(width / height)
    return min(options, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def center_crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width), in pixels of an image of ``size`` (width, height), of the
    centered region that, scaled to cover ``bucket`` (width, height), fills it exactly."""
    width, height = size
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    crop_width = min(width, round(bucket_width / scale))
    crop_height = min(height, round(bucket_height / scale))
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def resize_and_crop(
    image: Image.Image, bucket: tuple[int, int]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize ``image`` to cover ``bucket`` (width, height) and center-crop the overflow.

    Returns the (H, W, 3) pixels and the crop box (top, left, height, width) in the
    original image's pixels. The crop is chosen in original pixels and resampled in one
    step (PIL's ``box``), so the box is exact rather than a rounded back-projection.
    """
    top, left, height, width = crop_box = center_crop_box(image.size, bucket)
    box = (left, top, left + width, top + height)
    resized = image.resize(bucket, Image.Resampling.BICUBIC, box=box)
    return np.asarray(resized), crop_box  # (H, W, 3)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparency composited on white."""
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 0xFFFF)  # (H, W)
        image = Image.fromarray((grey >> 8).astype(np.uint8))  # (H, W) 'L'
    if image.has_transparency_data:
        # Transparent pixels hold arbitrary colours; white is what a viewer shows under them.
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


class MediaDecoder:
    """Ray Data stage: FetchMedia's rows -> decoded, bucketed rows (``DECODE_COLUMNS`` added).

    One row per image, one per video clip, one per quarantined input. Rows FetchMedia
    already quarantined pass through with their reason.
    """

    def __init__(self, config: DecodeConfig, bucket_config: BucketConfig) -> None:
        self.config = config
        self.buckets = buckets(bucket_config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        origins: list[int] = []  # the input row of each output row
        for index, (sample_id, kind, data, reason, detail) in enumerate(
            zip(
                batch["sample_id"],
                batch["media_kind"],
                batch["data"],
                batch["reason"],
                batch["detail"],
                strict=True,
            )
        ):
            try:
                if reason:
                    raise Quarantine(reason, detail)
                assert kind in ("image", "video"), f"{sample_id}: {kind} without a reason"
                if not data:
                    raise Quarantine("empty_file", "zero bytes")
                decoded = self._image(data) if kind == "image" else self._video(data)
            except Quarantine as quarantine:
                decoded = [_quarantined(quarantine)]
            for clip, row in enumerate(decoded):
                is_clip = kind == "video" and row["status"] == "ok"
                row["sample_id"] = f"{sample_id}-c{clip}" if is_clip else sample_id
                row["source_rows"] = len(decoded)
            rows += decoded
            origins += [index] * len(decoded)
        columns = _columns(rows)
        # Every other input column (caption, source_uri, ...) rides along; bytes are done.
        taken = np.array(origins, dtype=np.int64)
        for name, values in batch.items():
            if name not in columns and name != "data":
                columns[name] = values[taken]
        captions = [optional_text(caption) for caption in columns["caption_original"]]
        columns["caption_original"] = object_column(captions)
        return columns

    def _check_size(self, width: int, height: int) -> None:
        if width * height > self.config.max_pixels:
            raise Quarantine(
                "decompression_bomb",
                f"{width}x{height} pixels > decode.max_pixels {self.config.max_pixels}",
            )
        if min(width, height) < self.config.min_side:
            raise Quarantine(
                "too_small",
                f"{width}x{height}: shorter side < decode.min_side {self.config.min_side}",
            )

    def _open_image(self, data: bytes) -> Image.Image:
        """The upright RGB image (a multi-frame file's first frame), or Quarantine."""
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            self._check_size(*image.size)  # from the header: before pixels are decoded
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as err:  # PIL's own limit, 2x Image.MAX_IMAGE_PIXELS
            raise Quarantine("decompression_bomb", str(err)) from None
        except Image.UnidentifiedImageError:
            raise Quarantine("corrupt", "no image format PIL reads recognises it") from None
        except Quarantine:
            raise
        # Malformed files raise whatever the format's parser hits: OSError, SyntaxError,
        # ValueError, struct.error, EOFError, ... PIL has no type for truncation, only words.
        except Exception as err:
            reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
            raise Quarantine(reason, f"{type(err).__name__}: {err}") from None

    def _image(self, data: bytes) -> list[dict[str, Any]]:
        image = self._open_image(data)
        bucket = nearest_bucket(*image.size, self.buckets)
        pixels, crop_box = resize_and_crop(image, bucket)  # (H, W, 3)
        key = BucketKey(height=bucket[1], width=bucket[0])
        return [_decoded(pixels[None], image.size, crop_box, str(key))]

    def _video(self, data: bytes) -> list[dict[str, Any]]:
        try:
            with av.open(io.BytesIO(data)) as container:
                if not container.streams.video:
                    raise Quarantine("corrupt", "no video stream")
                stream = container.streams.video[0]
                size = (stream.codec_context.width, stream.codec_context.height)
                self._check_size(*size)
                bucket = nearest_bucket(*size, self.buckets)
                frames = (
                    resize_and_crop(frame.to_image(), bucket)[0]  # (H, W, 3)
                    for frame in self._sampled(container.decode(stream))
                )
                clips, num_frames = self._clips(frames)
        except av.FFmpegError as err:
            raise Quarantine("corrupt", f"{type(err).__name__}: {err}") from None
        if not num_frames:
            raise Quarantine("corrupt", "no frames decoded")
        if not clips:
            raise Quarantine(
                "too_short",
                f"{num_frames} frames at {self.config.video_fps} fps, no shot of "
                f"{self.config.video_num_frames}",
            )
        crop_box = center_crop_box(size, bucket)
        key = BucketKey(height=bucket[1], width=bucket[0], num_frames=self.config.video_num_frames)
        return [_decoded(clip, size, crop_box, str(key)) for clip in clips]

    def _sampled(self, frames: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        """The first frame of each 1/video_fps interval (every frame when the video's own
        rate is lower: frames are never repeated)."""
        start, next_slot = None, 0
        for frame in frames:
            if frame.time is None:
                raise Quarantine("corrupt", "a frame without a timestamp")
            start = frame.time if start is None else start
            # The epsilon absorbs float error in pts * time_base (1/24 s steps at 8 fps).
            slot = math.floor((frame.time - start) * self.config.video_fps + 1e-6)
            if slot >= next_slot:
                next_slot = slot + 1
                yield frame

    def _clips(self, frames: Iterator[np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Consecutive windows of ``video_num_frames`` sampled frames that never span a shot
        boundary: a cut restarts the window, the partial one is dropped. Stops decoding at
        ``video_max_clips``. Returns the clips, each (F, H, W, 3), and the frames seen."""
        clips: list[np.ndarray] = []
        window: list[np.ndarray] = []
        num_frames = 0
        for pixels in frames:  # (H, W, 3)
            num_frames += 1
            if window and _frame_difference(window[-1], pixels) > self.config.shot_threshold:
                window = []
            window.append(pixels)
            if len(window) == self.config.video_num_frames:
                clips.append(np.stack(window))  # (F, H, W, 3)
                window = []
                if len(clips) == self.config.video_max_clips:
                    break
        return clips, num_frames


def _frame_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 frames, on a [0, 1] scale."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255


def _decoded(
    pixels: np.ndarray, size: tuple[int, int], crop_box: tuple[int, int, int, int], bucket: str
) -> dict[str, Any]:
    """An ok row's decode columns; sample_id and source_rows are the caller's."""
    assert pixels.dtype == np.uint8 and pixels.ndim == 4 and pixels.shape[-1] == 3, pixels.shape
    width, height = size
    return {
        "pixels": pixels,  # (F, H, W, 3)
        "original_height": height,
        "original_width": width,
        "crop_box": crop_box,
        "bucket": bucket,
        "status": "ok",
        "reason": "",
        "detail": "",
    }


def _quarantined(quarantine: Quarantine) -> dict[str, Any]:
    return {
        "pixels": EMPTY_PIXELS,
        "original_height": 0,
        "original_width": 0,
        "crop_box": (0, 0, 0, 0),
        "bucket": "",
        "status": "quarantined",
        "reason": quarantine.reason,
        "detail": quarantine.detail,
    }


def decoded_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MediaDecoder's rows -> the decoded images alone, ``pixels`` (N, H, W, 3) uint8, for a
    consumer of pixels (the autoencoder's training): quarantined inputs and video clips are
    left out. One bucket's rows, so one shape."""
    images = [
        frames[0]  # (H, W, 3)
        for frames, status in zip(batch["pixels"], batch["status"], strict=True)
        if status == "ok" and len(frames) == 1
    ]
    if not images:
        return {"pixels": np.zeros((0, 1, 1, 3), dtype=np.uint8)}
    return {"pixels": np.stack(images)}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The columns MediaDecoder makes (DECODE_COLUMNS), from its rows."""
    columns = {name: object_column([row[name] for row in rows]) for name in DECODE_COLUMNS}
    for name in ("source_rows", "original_height", "original_width"):
        columns[name] = np.array([row[name] for row in rows], dtype=np.int32)
    boxes = [row["crop_box"] for row in rows]
    columns["crop_box"] = np.array(boxes, dtype=np.int32).reshape(len(rows), 4)  # (N, 4)
    return columns
