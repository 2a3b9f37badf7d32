"""The video stages, driven by a video job (video_jobs.py): UMT5 prompt encoding, the Wan
DiT (streaming its steps; for image-to-video, also encoding the input image), and the Wan
VAE decode to a checked, watermarked MP4."""

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import torch
from PIL import Image
from ray import serve

from actors.video import (
    VideoDecoder,
    VideoDenoiser,
    VideoEmbeddings,
    VideoImageConditioning,
    VideoImageEncoder,
    VideoPromptEncoder,
    encode_mp4,
    to_uint8,
)
from actors.watermark import embed_watermark
from flows.serve.messages import VideoDenoiseSpec, VideoModel
from flows.serve.replica import local_bundle, torch_dtype
from flows.serve.safety import image_checker
from schemas.config import ModelRef, SafetyConfig, StorageConfig


@serve.deployment
class VideoTextEncoderStage:
    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        self.encoder = VideoPromptEncoder(
            local_bundle(model, storage), device=model.device, dtype=torch_dtype(model)
        )
        self.num_requests = 0

    async def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance_scale: float,
        max_sequence_length: int,
    ) -> VideoEmbeddings:
        self.num_requests += 1
        return await asyncio.to_thread(
            self.encoder.encode, prompt, negative_prompt, guidance_scale, max_sequence_length
        )

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


@serve.deployment
class VideoDenoiserStage:
    """The video DiT. ``denoise`` streams ``(steps done, None)`` after each step and
    ``(num_steps, latents)`` last; each step runs in its own thread call, so a cancelled
    call stops between steps.

    An image-to-video bundle's replica also holds its image encoder and VAE encoder, as its
    pipeline does, and ``encode_image`` prepares the input image: the app builder reads no
    bundle, so the replica decides at start whether it has one (``model``)."""

    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        bundle = local_bundle(model, storage)
        self.denoiser = VideoDenoiser(bundle, device=model.device, dtype=torch_dtype(model))
        self.image_encoder = None
        if self.denoiser.family.conditions_on_image:
            self.image_encoder = VideoImageEncoder(
                bundle, device=model.device, dtype=torch_dtype(model)
            )
        self.num_requests = 0
        self.num_steps = 0
        self.num_images = 0

    async def model(self) -> VideoModel:
        """What the bundle fixes about video requests: sizes, frame counts, an input image."""
        return VideoModel(
            pipeline=self.denoiser.family.class_name,
            multiples=self.denoiser.multiples,
            takes_image=self.image_encoder is not None,
        )

    async def encode_image(
        self, image: Image.Image, height: int, width: int, num_frames: int
    ) -> VideoImageConditioning:
        assert self.image_encoder is not None, "a text-to-video bundle takes no image"
        self.num_images += 1
        return await asyncio.to_thread(self.image_encoder.encode, image, height, width, num_frames)

    async def denoise(
        self,
        spec: VideoDenoiseSpec,
        embeddings: VideoEmbeddings,
        image: VideoImageConditioning | None = None,
    ) -> AsyncIterator[tuple[int, torch.Tensor | None]]:
        self.num_requests += 1
        steps = self.denoiser.steps(spec.request(embeddings, image))
        while True:
            step, latents = await asyncio.to_thread(next, steps)
            self.num_steps += 1
            yield step, latents
            if latents is not None:
                return

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests, "steps": self.num_steps, "images": self.num_images}


@serve.deployment
class VideoDecodeStage:
    """Wan VAE decode; the image safety check (when configured) on every frame and the
    invisible watermark in every frame, as the safety stage does for images; H.264 MP4."""

    def __init__(self, model: ModelRef, storage: StorageConfig, safety: SafetyConfig) -> None:
        self.decoder = VideoDecoder(
            local_bundle(model, storage), device=model.device, dtype=torch_dtype(model)
        )
        self.watermark_key = safety.watermark_key
        self.checker = image_checker(safety, storage)
        self.num_requests = 0

    async def mp4(self, latents: torch.Tensor, fps: int) -> tuple[bytes, bool]:
        """The MP4, and whether the checker flagged a frame (then every frame is black)."""
        self.num_requests += 1
        return await asyncio.to_thread(self._mp4, latents, fps)

    def _mp4(self, latents: torch.Tensor, fps: int) -> tuple[bytes, bool]:
        frames = to_uint8(self.decoder.decode(latents))  # (F, H, W, 3)
        flagged = False
        if self.checker is not None:
            frames, flagged = self.checker.check_video(frames)
        marked = np.stack([embed_watermark(frame, self.watermark_key) for frame in frames])
        return encode_mp4(marked, fps), flagged

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}
