"""`raygen evaluate`'s Ray Data stages: images for (prompt, seed) rows, from a bundle or from a
running server, and their scores.

- ``BundleImages`` holds the bundle's own diffusers pipeline and generates a batch of rows in
  one call, each row with a generator seeded by its own seed, so an image depends on its
  (prompt, seed, settings) alone, as it does through `raygen serve` or plain diffusers.
- ``ServerImages`` asks a running `raygen serve` for the same rows (``POST /v1/generate``,
  one request per row, its seed given), so a served model is scored as users receive it.
- ``ImageScores`` reads each image back: the shapes detector's verdict against the prompt
  (when the prompt is a shapes caption) and the CLIP score (torchmetrics' ``CLIPScore``,
  100 x max(cosine, 0) of the CLIP image and text embeddings).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from actors.loaders import load_model, load_pipeline, load_processor
from actors.shape_detector import detect_image, detect_video
from actors.video import encode_mp4, to_uint8
from cluster.bundles import SAMPLING_FILE, resolve_bundle
from cluster.storage import Storage, is_s3
from flows.client import generate_image
from schemas.api import GenerateRequest
from schemas.config import FidConfig, ModelRef, StorageConfig
from schemas.shapes import ShapeCaption


def resolve_model_file(uri: str, storage: Storage) -> Path:
    """A single weights file, local or s3:// (downloaded once into the storage cache)."""
    if not is_s3(uri):
        return Path(uri)
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = Path(storage.config.cache_dir).expanduser() / "files" / digest / uri.rsplit("/", 1)[1]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(uri, target)
    return target


def png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sampling_settings(
    bundle_dir: Any, num_inference_steps: int | None, guidance_scale: float | None
) -> dict[str, Any]:
    """The pipeline arguments a bundle is sampled with: the given ones, else those a distilled
    bundle records (raygen_sampling.json), else none (the pipeline's defaults)."""
    path = bundle_dir / SAMPLING_FILE
    recorded = json.loads(path.read_text()) if path.exists() else {}
    given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return {**recorded, **{key: value for key, value in given.items() if value is not None}}


def filmstrip(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) -> (H, F * W, 3): a video's frames side by side, left to right."""
    return np.concatenate(list(frames), axis=1)


def strip_frames(strip: np.ndarray, count: int) -> np.ndarray:
    """``filmstrip``'s inverse: (H, F * W, 3) -> (F, H, W, 3)."""
    return np.stack(np.split(strip, count, axis=1))


class BundleImages:
    """Ray Data stage: rows with ``prompt`` and ``seed`` -> ``image`` (PNG bytes) and
    ``frames`` added. A video bundle's video is ``image`` as a filmstrip of its ``frames``
    frames (what the scorer reads and the grid shows), and ``video`` (MP4 bytes)."""

    def __init__(
        self,
        bundle: ModelRef,
        storage: StorageConfig,
        height: int,
        width: int,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        max_sequence_length: int,
        num_frames: int = 1,
        fps: int = 8,
    ) -> None:
        self.pipe = load_pipeline(bundle, storage)
        self.pipe.set_progress_bar_config(disable=True)
        bundle_dir = resolve_bundle(bundle.uri, Storage(storage))
        self.settings = {
            "height": height,
            "width": width,
            **sampling_settings(bundle_dir, num_inference_steps, guidance_scale),
        }
        parameters = inspect.signature(self.pipe.__call__).parameters
        if "max_sequence_length" in parameters:
            self.settings["max_sequence_length"] = max_sequence_length
        self.video = "num_frames" in parameters
        if self.video:
            self.settings["num_frames"] = num_frames
        self.fps = fps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        device = self.pipe.device
        generators = [torch.Generator(device).manual_seed(int(seed)) for seed in batch["seed"]]
        output = self.pipe(
            prompt=[str(prompt) for prompt in batch["prompt"]],
            generator=generators,
            output_type="np",
            **self.settings,
        )
        if not self.video:
            pixels = to_uint8(np.asarray(output.images))  # (B, H, W, 3)
            images = np.array([png(p) for p in pixels], dtype=object)
            return {**batch, "image": images, "frames": np.ones(len(pixels), dtype=np.int64)}
        videos = to_uint8(np.asarray(output.frames))  # (B, F, H, W, 3)
        return {
            **batch,
            "image": np.array([png(filmstrip(v)) for v in videos], dtype=object),
            "frames": np.full(len(videos), videos.shape[1], dtype=np.int64),
            "video": np.array([encode_mp4(v, self.fps) for v in videos], dtype=object),
        }


class ServerImages:
    """Ray Data stage: rows with ``prompt`` and ``seed`` -> ``image`` (the served PNG)."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        height: int,
        width: int,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        timeout_s: float,
    ) -> None:
        self.url, self.api_key, self.timeout_s = url, api_key, timeout_s
        given = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        # Left None: the server's request defaults.
        self.settings = {
            "height": height,
            "width": width,
            **{key: value for key, value in given.items() if value is not None},
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = []
        for prompt, seed in zip(batch["prompt"], batch["seed"], strict=True):
            request = GenerateRequest(prompt=str(prompt), seed=int(seed), **self.settings)
            response = generate_image(self.url, request, self.api_key, self.timeout_s)
            images.append(base64.b64decode(response.images[0].b64_json))
        frames = np.ones(len(images), dtype=np.int64)
        return {**batch, "image": np.array(images, dtype=object), "frames": frames}


class CLIPFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors, as torchmetrics' CLIPScore (1.9) takes them: transformers 5 returns
    them as an output object's ``pooler_output``, which CLIPScore does not unpack."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return self._tensor(features)


def clip_model_and_processor(clip: ModelRef, storage: StorageConfig | None = None) -> tuple:
    """What CLIPScore's ``model_name_or_path`` loader returns for a local (or s3://) CLIP
    folder: CLIPScore itself loads only the hub names it knows."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPFeatures(load_model(clip, CLIPModel, storage))
    return model, load_processor(clip, CLIPProcessor, storage)


class ImageScores:
    """Ray Data stage: rows with ``prompt`` and ``image`` -> per-image scores added:
    ``color``, ``shape``, ``place``, ``direction`` (True/False where the prompt names one, else
    None) with what the detector saw (``seen_*``), and ``clip_score`` (NaN without a model)."""

    CATEGORIES = ("color", "shape", "place", "direction")

    def __init__(self, clip: ModelRef | None, storage: StorageConfig) -> None:
        self.clip = None
        if clip is not None:
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(
                model_name_or_path=lambda: clip_model_and_processor(clip, storage)
            )

    def clip_score(self, pixels: np.ndarray, prompt: str) -> float:
        """One image's CLIP score: what CLIPScore over this image alone computes."""
        assert self.clip is not None
        self.clip.reset()
        self.clip.update(torch.tensor(pixels).permute(2, 0, 1)[None], [prompt])  # (1, 3, H, W)
        return float(self.clip.compute())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns: dict[str, list[Any]] = {name: [] for name in self.CATEGORIES}
        columns |= {f"seen_{name}": [] for name in self.CATEGORIES}
        columns["clip_score"] = []
        rows = zip(batch["prompt"], batch["image"], batch["frames"], strict=True)
        for prompt, data, count in rows:
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, F * W, 3)
            frames = strip_frames(pixels, int(count))  # (F, H, W, 3)
            caption = ShapeCaption.parse(str(prompt))
            # A video is read as a video, an image as an image: a caption of the other kind
            # (a motion asked of an image) is not scored.
            video = len(frames) > 1
            detection = detect_video(frames) if video else detect_image(frames[0])
            kind_matches = caption is not None and (caption.direction is not None) == video
            for name in self.CATEGORIES:
                seen = getattr(detection, name)
                columns[f"seen_{name}"].append(seen)
                wanted = caption.value(name) if kind_matches else None
                columns[name].append(None if wanted is None else seen == wanted)
            # CLIP sees the middle frame of a video.
            middle = frames[len(frames) // 2]
            with torch.no_grad():
                score = self.clip_score(middle, str(prompt)) if self.clip else float("nan")
            columns["clip_score"].append(score)
        return {
            **batch,
            **{name: np.array(values, dtype=object) for name, values in columns.items()},
        }


def fid_skip_reason(config: FidConfig) -> str | None:
    """Why FID cannot be computed with ``config`` (never by downloading weights), or None."""
    if config.reference is None:
        return "no fid.reference images configured"
    if config.feature_extractor is None and config.inception is None:
        return (
            "no fid.feature_extractor (TorchScript) or fid.inception weights file configured; "
            "weights are never downloaded"
        )
    if config.feature_extractor is None:
        import importlib.util

        if importlib.util.find_spec("torch_fidelity") is None:
            return "fid.inception needs torch-fidelity's Inception-v3 (pip install torch-fidelity)"
    return None


def frechet_distance(
    generated: np.ndarray, reference: np.ndarray, config: FidConfig, storage: StorageConfig | None
) -> float:
    """torchmetrics' FrechetInceptionDistance between ``reference`` (real) and ``generated``
    (fake) images, each (N, H, W, 3) uint8, with the features ``config`` names."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if config.feature_extractor is not None:
        path = resolve_model_file(config.feature_extractor, Storage(storage))
        fid = FrechetInceptionDistance(feature=torch.jit.load(str(path)).eval())
    else:
        path = resolve_model_file(config.inception, Storage(storage))
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    with torch.no_grad():
        for images, real in ((reference, True), (generated, False)):
            for start in range(0, len(images), 64):
                chunk = torch.tensor(images[start : start + 64]).permute(0, 3, 1, 2)  # (B, 3, H, W)
                fid.update(chunk, real=real)
        return float(fid.compute())
