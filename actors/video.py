"""The video graph's stages (Wan family): UMT5 text encoder, the input image's encoder (Wan
image-to-video), video transformer, video VAE decode, and MP4 encoding, each a plain class
that loads once from a bundle folder.

Every stage computes exactly what ``WanPipeline.__call__`` (``WanImageToVideoPipeline``'s
for an image-to-video bundle) computes: the encoders call the pipeline's own
``encode_prompt``, ``encode_image`` and ``prepare_latents``, the denoiser repeats its loop
(same initial noise per seed, conditional and unconditional forwards, the bundle's scheduler
doing every step) and the decoder its tail. ``tests/actors/test_video.py`` checks the staged
video against the pipelines.

The denoiser is a generator over steps, so a caller can report progress and stop between
steps. Tensors leave a stage on the CPU, so Ray's object store can hand them to a stage on
any machine. A ``bundle_dir`` is a local folder in diffusers' layout (resolve ``s3://``
first).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from actors.families import FamilyError, family_of
from cluster.bundles import read_bundle_json


def _wan_21_layout(bundle_dir: str | Path) -> None:
    """Raises unless the bundle denoises as Wan 2.1 does, the layout the stages repeat: Wan
    2.2's two-expert split (``boundary_ratio``, a second transformer) and its 5B model's
    per-token timesteps (``expand_timesteps``) take other loops."""
    index = read_bundle_json(bundle_dir, "model_index.json")
    unsupported = [key for key in ("boundary_ratio", "expand_timesteps") if index.get(key)]
    if unsupported:
        raise FamilyError(
            f"bundle {bundle_dir}: a Wan 2.2 layout ({', '.join(unsupported)} set), which the "
            "video stages do not run yet; Wan 2.1 bundles (text- and image-to-video) are served"
        )


# x264's constant rate factor for served MP4s (0: lossless, 23: x264's default). Measured with
# yuv444p on the tiny model's 32x48 frames, the hard case (few coefficients per watermark bit,
# much high-frequency colour): at 2 no frame of 24 videos read fewer than 30 of the 32 bits
# (29 count as marked), at 6 frames read 22; PSNR to the unmarked frames is 44 dB at 2.
# Frames of 256x256 and up read 32 of 32 at 2.
MP4_CRF = 2


@dataclass(frozen=True)
class VideoEmbeddings:
    """One prompt's UMT5 conditioning, as ``WanPipeline.encode_prompt`` returns it for a
    batch of one; the negative one is None when the request has no guidance."""

    prompt_embeds: torch.Tensor  # (L, D)
    negative_prompt_embeds: torch.Tensor | None  # (L, D)


@dataclass(frozen=True)
class VideoImageConditioning:
    """What an image-to-video transformer reads of the input image, as
    ``WanImageToVideoPipeline`` prepares it for one video."""

    image_embeds: torch.Tensor  # (N, D): the image encoder's second-to-last hidden states
    # (4 + C, f, h, w): the first-frame mask (the VAE's temporal factor folded into 4
    # channels), then the normalised latents of the image followed by black frames.
    condition: torch.Tensor


@dataclass(frozen=True)
class VideoDenoiseRequest:
    embeddings: VideoEmbeddings
    seed: int
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    image: VideoImageConditioning | None = None  # an image-to-video bundle's input image


class VideoPromptEncoder:
    """The bundle's text encoder (Wan: UMT5) through the family's ``encode_prompt``."""

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family_of(bundle_dir, media="video")
        self.pipe = self.family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **self.family.unloaded("text_encoders", "tokenizers")
        ).to(device)

    def encode(
        self,
        prompt: str,
        negative_prompt: str | None,
        guidance_scale: float,
        max_sequence_length: int,
    ) -> VideoEmbeddings:
        # The pipeline encodes a negative prompt (None: the empty text) only with guidance,
        # in a call of its own through the same code as the prompt.
        negative_embeds = None
        if guidance_scale > 1.0:
            negative_embeds = self._encode(negative_prompt or "", max_sequence_length)
        return VideoEmbeddings(self._encode(prompt, max_sequence_length), negative_embeds)

    def _encode(self, text: str, max_sequence_length: int) -> torch.Tensor:
        prompt_embeds, _ = self.family.encode_prompt(self.pipe, [text], max_sequence_length)
        return prompt_embeds[0].to("cpu", copy=True)  # (L, D)


class VideoImageEncoder:
    """An image-to-video bundle's image encoder and VAE: the input image as its transformer
    reads it, through the pipeline's own ``encode_image`` and ``prepare_latents``."""

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        pipe: Any = None,
    ) -> None:
        """``pipe``: the bundle's pipeline already loaded with (at least) its image encoder
        and VAE, on ``device`` (prep's latent encoder shares its own)."""
        self.device = torch.device(device)
        self.family = family_of(bundle_dir, media="video")
        if not self.family.conditions_on_image:
            raise FamilyError(f"bundle {bundle_dir}: a {self.family.class_name} takes no image")
        _wan_21_layout(bundle_dir)
        if pipe is None:
            pipe = self.family.pipeline.from_pretrained(
                bundle_dir, dtype=dtype, **self.family.unloaded("image_encoders", "vae")
            ).to(self.device)
        self.pipe = pipe
        self.multiples = self.family.multiples(bundle_dir)

    def encode(
        self, image: Image.Image, height: int, width: int, num_frames: int
    ) -> VideoImageConditioning:
        pipe = self.pipe
        with torch.no_grad():
            image_embeds = pipe.encode_image(image, self.device)  # (1, N, D)
            # The pipeline's order: the image resized to the video's size in float32, then its
            # first frame and black ones VAE-encoded (the mode, not a sample: no randomness).
            pixels = pipe.video_processor.preprocess(image, height=height, width=width)
            pixels = pixels.to(self.device, dtype=torch.float32)  # (1, 3, H, W)
            shape = (
                1,
                pipe.vae.config.z_dim,
                self.multiples.latent_frames(num_frames),
                height // self.multiples.latent,
                width // self.multiples.latent,
            )
            # prepare_latents only moves latents it is given: these zeros stand in for the
            # noise, which the denoiser draws from the request's seed.
            _, condition = pipe.prepare_latents(
                pixels, 1, shape[1], height, width, num_frames, torch.float32, self.device,
                latents=torch.zeros(shape),
            )  # fmt: skip
        return VideoImageConditioning(
            image_embeds=image_embeds[0].to("cpu", copy=True),  # (N, D)
            condition=condition[0].to("cpu", copy=True),  # (4 + C, f, h, w)
        )


class VideoDenoiser:
    """The bundle's video transformer and scheduler.

    ``steps`` yields after every denoising step, so the caller decides between steps whether
    to go on; each call builds its own scheduler (UniPC keeps history across steps), so
    nothing carries over from one video to the next.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.family = family_of(bundle_dir, media="video")
        _wan_21_layout(bundle_dir)
        pipe = self.family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **self.family.unloaded("denoisers")
        )
        self.transformer = pipe.transformer.to(self.device).eval()
        # A template only: each video steps a fresh copy of it.
        self.scheduler = pipe.scheduler
        self.multiples = self.family.multiples(bundle_dir)
        self.latent_channels = self.family.latent_channels(self.transformer.config)

    def check(self, height: int, width: int, num_frames: int, image: bool | None = None) -> None:
        """Raises unless the bundle makes videos of this size and frame count, and (where
        ``image`` is given) unless it takes an input image exactly when there is one."""
        self.multiples.check_size(height, width)
        self.multiples.check_frames(num_frames)
        takes_image = self.family.conditions_on_image
        if image is not None and image != takes_image:
            name = self.family.class_name
            raise FamilyError(
                f"image: a {name} animates an input image; send one"
                if takes_image
                else f"image: a {name} makes videos from text alone; it takes no image"
            )

    def steps(self, request: VideoDenoiseRequest) -> Iterator[tuple[int, torch.Tensor | None]]:
        """After each step: (steps done, None); after the last: (num_steps, latents
        (C, F, h, w)) in the pipeline's latent space, before the VAE's normalization, on the
        CPU."""
        self.check(request.height, request.width, request.num_frames, request.image is not None)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(request.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        timesteps = scheduler.timesteps  # (N,)
        latents = self._initial_latents(request)  # (1, C, F, h, w), float32 as the pipeline
        dtype = self.transformer.dtype
        prompt_embeds = request.embeddings.prompt_embeds[None].to(self.device, dtype)
        guided = request.guidance_scale > 1.0
        if guided:
            negative_embeds = request.embeddings.negative_prompt_embeds
            assert negative_embeds is not None, "guided requests carry a negative embedding"
            negative_embeds = negative_embeds[None].to(self.device, dtype)
        # Image-to-video: the image's tokens beside the text's, and its first-frame latents
        # and mask beside the noisy ones, in both passes.
        image = None
        if request.image is not None:
            image = (
                request.image.image_embeds[None].to(self.device, dtype),  # (1, N, D)
                request.image.condition[None].to(self.device),  # (1, 4 + C, f, h, w)
            )

        for index, t in enumerate(timesteps):
            with torch.no_grad():
                model_input = latents.to(dtype)
                timestep = t.expand(latents.shape[0])
                # The family's call, as the pipeline makes it (image-to-video: the image's
                # tokens and first-frame latents beside the text's and the noisy ones).
                noise_pred = self.family.predict(
                    self.transformer, model_input, timestep, prompt_embeds, image=image
                )  # (1, C, F, h, w)
                if guided:
                    noise_uncond = self.family.predict(
                        self.transformer, model_input, timestep, negative_embeds, image=image
                    )
                    noise_pred = noise_uncond + request.guidance_scale * (noise_pred - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if index + 1 < len(timesteps):
                yield index + 1, None
        yield len(timesteps), latents[0].to("cpu", copy=True)

    def denoise(self, request: VideoDenoiseRequest) -> torch.Tensor:
        """All steps at once: latents (C, F, h, w)."""
        *_, (_, latents) = self.steps(request)
        assert latents is not None
        return latents

    def _initial_latents(self, request: VideoDenoiseRequest) -> torch.Tensor:
        # What WanPipeline.prepare_latents draws for one prompt given a seeded CPU generator.
        shape = (
            1,
            self.latent_channels,
            self.multiples.latent_frames(request.num_frames),
            request.height // self.multiples.latent,
            request.width // self.multiples.latent,
        )
        generator = torch.Generator("cpu").manual_seed(request.seed)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)


class VideoDecoder:
    """The bundle's video VAE: latents to frames, as the family's pipeline's tail does."""

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family_of(bundle_dir, media="video")
        self.pipe = self.family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **self.family.unloaded("vae")
        ).to(device)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(F, H, W, 3) float32 frames in [0, 1] (the pipeline's ``output_type="np"``) from
        latents (C, f, h, w)."""
        vae = self.pipe.vae
        batch = latents[None].to(vae.device, vae.dtype)  # (1, C, f, h, w)
        batch = self.family.denormalize(batch, vae.config)
        with torch.no_grad():
            video = vae.decode(batch, return_dict=False)[0]  # (1, 3, F, H, W)
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")
        return np.asarray(frames[0], dtype=np.float32)  # (F, H, W, 3)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (frames * 255).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 MP4 of uint8 frames (F, H, W, 3), with full-resolution chroma (yuv444p) at
    x264's near-lossless ``MP4_CRF``, so the invisible watermark in each frame survives.

    yuv420p, the format every player opens, halves the chroma resolution and with it erases
    the chroma part of the watermark: on 32x48 frames no quality setting, lossless included,
    kept it readable. yuv444p means H.264's High 4:4:4 profile, which ffmpeg-based players
    (VLC, mpv) open and some browsers and hardware decoders do not.
    """
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
