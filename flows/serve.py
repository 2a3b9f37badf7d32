"""`raygen serve`: multi-stage text-to-image generation on Ray Serve.

Each stage is one deployment wrapping an ``actors/`` class, with its own replicas (or
autoscaling, scale to zero included), resources, queue bounds and batching, all from
``ServeConfig``::

    ingress (FastAPI: auth, validation, prompt filter, native and OpenAI routes)
      -> text_encoder (CLIP + T5, LRU cache; batched)
      -> base (SD3 DiT, CFG as one forward; requests batched by shape and step count;
               streams steps to a streaming request; a batch whose requests were all
               cancelled stops between steps)
      -> refiner (optional per request: the base stops at denoising_end, it continues)
      -> vae_decode
      -> super_resolution_1..n (optional per request: x4 stages, noise-level conditioning)
      -> safety (image check, invisible watermark, PNG)

    video (when configured; asynchronous jobs: POST /v1/videos, GET/DELETE /v1/videos/{id}):
    ingress -> video_jobs (job records; drives each job)
      -> video_text_encoder (UMT5) -> video_denoiser (Wan DiT; streams progress per step)
      -> video_vae_decode (Wan VAE, safety check and watermark on every frame, MP4)
      -> storage (the MP4, and each job's record as JSON, so jobs outlive the replica)

Latents, embeddings and images travel between stages as handle-call arguments and results,
so through Ray's object store. ``build_app`` is the one place the graph is built: ``raygen
serve`` runs it locally, and ``serve run flows.serve:app_builder config=serve.yaml`` or a
Serve config file's ``import_path: flows.serve:app_builder`` (``args: {config: ...}``) deploy
the same graph.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime,
# and Serve's class-based views cannot resolve them as strings.
import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import random
import re
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, Upscaler, VaeDecoder
from actors.safety import ImageSafetyChecker, PromptFilter, embed_watermark
from actors.video import (
    VideoDecoder,
    VideoDenoiser,
    VideoDenoiseRequest,
    VideoEmbeddings,
    VideoPromptEncoder,
    encode_mp4,
    to_uint8,
)
from cluster.bundles import resolve_bundle
from cluster.ray_runtime import init_ray
from cluster.storage import Storage, is_s3, local_path
from schemas.api import (
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
    VideoJob,
    VideoRequest,
)
from schemas.config import (
    ConfigError,
    DeploymentSettings,
    ModelRef,
    SafetyConfig,
    ServeConfig,
    ServeVideoConfig,
    StorageConfig,
    SuperResolutionStage,
    load_config,
)

APP_NAME = "raygen"
IMAGES_FOLDER = "images"
VIDEOS_FOLDER = "videos"
VIDEO_JOBS_FOLDER = "video_jobs"  # one JSON record per job
# Stored outputs by suffix: (folder under `output`, media type).
_FILES = {".png": (IMAGES_FOLDER, "image/png"), ".mp4": (VIDEOS_FOLDER, "video/mp4")}
_FILE_NAME = re.compile(r"^[0-9a-f]{32}(\.png|\.mp4)$")
# Buckets of the per-stage seconds histogram: a tiny model's stage on a CPU up to a large
# model's whole request.
_STAGE_SECONDS_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="raygen",
    description="Multi-stage text-to-image generation: native and OpenAI-compatible routes.",
)


def _torch_dtype(model: ModelRef) -> torch.dtype:
    return getattr(torch, model.dtype)


def _local_bundle(model: ModelRef, storage: StorageConfig) -> str:
    return str(resolve_bundle(model.uri, Storage(storage)))


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodeItem:
    """One request's texts for the shared text encoders."""

    prompt: str
    negative_prompt: str | None
    max_sequence_length: int


@serve.deployment
class TextEncoderStage:
    """CLIP + T5 for every stage that needs embeddings; concurrent requests' uncached texts
    go through the encoders as one batch."""

    def __init__(
        self,
        model: ModelRef,
        storage: StorageConfig,
        settings: DeploymentSettings,
        cache_size: int,
    ) -> None:
        self.encoder = PromptEncoder(
            _local_bundle(model, storage),
            device=model.device,
            dtype=_torch_dtype(model),
            cache_size=cache_size,
        )
        self.encode.set_max_batch_size(settings.max_batch_size)
        self.encode.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.num_requests = 0

    @serve.batch
    async def encode(self, items: list[EncodeItem]) -> list[Any]:
        self.num_requests += len(items)
        groups: dict[int, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.max_sequence_length].append(index)
        results: list[Any] = [None] * len(items)
        for max_sequence_length, indices in groups.items():
            embeddings = await asyncio.to_thread(
                self.encoder.encode,
                [items[i].prompt for i in indices],
                [items[i].negative_prompt for i in indices],
                max_sequence_length,
            )
            for index, embedding in zip(indices, embeddings, strict=True):
                results[index] = embedding
        return results

    async def stats(self) -> dict[str, int]:
        return {
            "requests": self.num_requests,
            "cache_hits": self.encoder.hits,
            "cache_misses": self.encoder.misses,
        }


@dataclass(eq=False)
class _Denoising:
    """One request in a denoiser stage: its caller's step callback (streaming callers), and
    whether its caller has gone (a timeout or a disconnect cancelled the call)."""

    request: DenoiseRequest
    on_step: Callable[[int, int], None] | None = None  # (steps done, num steps)
    steps_done: int = 0  # written by the thread that runs the batch
    cancelled: bool = False


@serve.deployment
class DenoiserStage:
    """The base DiT or the refiner: concurrent requests that share (height, width, steps,
    sequence length) denoise together, one transformer forward per step for all of them and
    both halves of their classifier-free guidance.

    ``denoise`` returns a request's latents; ``denoise_steps`` streams its progress first, as
    the video denoiser does. A call cancelled while its batch runs (Serve cancels the
    caller's coroutine, not the batch) marks its request; a batch stops between steps once
    every request in it is marked, so a timed-out request leaves no work running.
    """

    def __init__(
        self, model: ModelRef, storage: StorageConfig, settings: DeploymentSettings
    ) -> None:
        self.denoiser = Denoiser(
            _local_bundle(model, storage), device=model.device, dtype=_torch_dtype(model)
        )
        self._denoise_batch.set_max_batch_size(settings.max_batch_size)
        self._denoise_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.num_requests = 0
        self.batch_sizes: Counter[int] = Counter()  # requests per call -> calls
        self.num_steps = 0  # steps run, one per step of a call whatever its batch size
        self.num_stopped = 0  # calls stopped early: every request in them was cancelled

    async def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's downscale times the patch size."""
        return self.denoiser.vae_scale_factor * self.denoiser.transformer.config.patch_size

    async def denoise(self, request: DenoiseRequest) -> torch.Tensor:
        """The request's latents (C, h, w)."""
        return await self._denoise_one(_Denoising(request))

    async def denoise_steps(
        self, request: DenoiseRequest
    ) -> AsyncIterator[tuple[int, int, torch.Tensor | None]]:
        """``denoise``, streamed: ``(steps done, num_steps, None)`` after each step of the
        request's span, ``(num_steps, num_steps, latents)`` last."""
        steps: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        item = _Denoising(request, on_step=lambda done, total: steps.put_nowait((done, total)))
        result = asyncio.ensure_future(self._denoise_one(item))
        # After the last step's callback: the batch's thread schedules those first.
        result.add_done_callback(lambda _: steps.put_nowait(None))
        try:
            last = (0, 0)
            while (step := await steps.get()) is not None:
                last = step
                yield (*step, None)
            yield (*last, await result)
        finally:
            result.cancel()  # the caller went away: mark the request (a no-op once done)

    async def _denoise_one(self, item: _Denoising) -> torch.Tensor:
        try:
            return await self._denoise_batch(item)
        except asyncio.CancelledError:
            item.cancelled = True
            raise

    @serve.batch
    async def _denoise_batch(self, items: list[_Denoising]) -> list[torch.Tensor | None]:
        self.num_requests += len(items)
        loop = asyncio.get_running_loop()
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            groups[item.request.batch_key].append(index)
        results: list[Any] = [None] * len(items)
        for indices in groups.values():
            group = [items[i] for i in indices]
            if all(item.cancelled for item in group):
                continue  # cancelled while an earlier group ran
            self.batch_sizes[len(group)] += 1
            latents = await asyncio.to_thread(
                self.denoiser.denoise,
                [item.request for item in group],
                lambda done, num_steps, group=group: self._step_end(loop, group, done, num_steps),
            )
            for index, sample in zip(indices, latents, strict=True):
                results[index] = sample  # (C, h, w)
        return results

    def _step_end(
        self,
        loop: asyncio.AbstractEventLoop,
        group: list[_Denoising],
        steps_done: list[int],
        num_steps: list[int],
    ) -> bool:
        """After each step of a call, in its thread: progress to the streaming callers; True
        (stop the call) once every request in it is cancelled."""
        self.num_steps += 1
        for item, done, total in zip(group, steps_done, num_steps, strict=True):
            if item.on_step is not None and done != item.steps_done:
                loop.call_soon_threadsafe(item.on_step, done, total)
            item.steps_done = done
        stop = all(item.cancelled for item in group)
        self.num_stopped += stop
        return stop

    async def stats(self) -> dict[str, Any]:
        return {
            "requests": self.num_requests,
            "batch_sizes": dict(self.batch_sizes),
            "steps": self.num_steps,
            "stopped": self.num_stopped,
        }


@serve.deployment
class VaeDecodeStage:
    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        self.decoder = VaeDecoder(
            _local_bundle(model, storage), device=model.device, dtype=_torch_dtype(model)
        )
        self.num_requests = 0

    async def decode(self, latents: list[torch.Tensor], output_type: str) -> list[np.ndarray]:
        self.num_requests += 1
        return await asyncio.to_thread(self.decoder.decode, latents, output_type)

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


@serve.deployment
class SuperResolutionDeployment:
    """One x4 stage of the cascade; its noise level, steps and guidance come from config."""

    def __init__(self, stage: SuperResolutionStage, storage: StorageConfig) -> None:
        self.stage = stage
        self.upscaler = Upscaler(
            _local_bundle(stage.model, storage),
            device=stage.model.device,
            dtype=_torch_dtype(stage.model),
        )
        # The pipeline keeps per-call state on itself: one call at a time.
        self.lock = asyncio.Lock()
        self.num_requests = 0

    async def upscale(
        self,
        images: list[np.ndarray],
        prompt: str,
        negative_prompt: str | None,
        seeds: list[int],
    ) -> list[np.ndarray]:
        self.num_requests += 1
        async with self.lock:
            return await asyncio.to_thread(
                self.upscaler.upscale,
                images,
                [prompt] * len(images),
                seeds,
                noise_level=self.stage.noise_level,
                num_inference_steps=self.stage.num_inference_steps,
                guidance_scale=self.stage.guidance_scale,
                negative_prompts=[negative_prompt] * len(images),
            )

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


def _image_checker(safety: SafetyConfig, storage: StorageConfig) -> ImageSafetyChecker | None:
    """The configured image classifier, shared by image and video outputs; None: no check."""
    if safety.image_checker is None:
        return None
    return ImageSafetyChecker(
        _local_bundle(safety.image_checker, storage),
        safety.max_nsfw_score,
        device=safety.image_checker.device,
        dtype=_torch_dtype(safety.image_checker),
    )


@serve.deployment
class SafetyStage:
    """The last stage: image safety check (when configured), invisible watermark, PNG."""

    def __init__(self, safety: SafetyConfig, storage: StorageConfig) -> None:
        self.watermark_key = safety.watermark_key
        self.checker = _image_checker(safety, storage)
        self.num_requests = 0

    async def finish(self, images: list[np.ndarray]) -> tuple[list[bytes], list[bool]]:
        """PNG bytes of each uint8 image, and whether the checker blacked it out."""
        self.num_requests += 1
        return await asyncio.to_thread(self._finish, images)

    def _finish(self, images: list[np.ndarray]) -> tuple[list[bytes], list[bool]]:
        flagged = [False] * len(images)
        if self.checker is not None:
            images, flagged = self.checker.check(images)
        pngs = [_png(embed_watermark(image, self.watermark_key)) for image in images]
        return pngs, flagged

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------
# Video stages (asynchronous jobs)
# ---------------------------------------------------------------------------------------


@serve.deployment
class VideoTextEncoderStage:
    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        self.encoder = VideoPromptEncoder(
            _local_bundle(model, storage), device=model.device, dtype=_torch_dtype(model)
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
    call stops between steps."""

    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        self.denoiser = VideoDenoiser(
            _local_bundle(model, storage), device=model.device, dtype=_torch_dtype(model)
        )
        self.num_requests = 0
        self.num_steps = 0

    async def shape_factors(self) -> tuple[int, int]:
        """(sides' multiple: VAE spatial downscale x patch, the VAE's temporal downscale)."""
        return self.denoiser.size_multiple, self.denoiser.vae_scale_factor_temporal

    async def denoise(
        self, request: VideoDenoiseRequest
    ) -> AsyncIterator[tuple[int, torch.Tensor | None]]:
        self.num_requests += 1
        steps = self.denoiser.steps(request)
        while True:
            step, latents = await asyncio.to_thread(next, steps)
            self.num_steps += 1
            yield step, latents
            if latents is not None:
                return

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests, "steps": self.num_steps}


@serve.deployment
class VideoDecodeStage:
    """Wan VAE decode; the image safety check (when configured) on every frame and the
    invisible watermark in every frame, as the safety stage does for images; H.264 MP4."""

    def __init__(self, model: ModelRef, storage: StorageConfig, safety: SafetyConfig) -> None:
        self.decoder = VideoDecoder(
            _local_bundle(model, storage), device=model.device, dtype=_torch_dtype(model)
        )
        self.watermark_key = safety.watermark_key
        self.checker = _image_checker(safety, storage)
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


_FINISHED = ("succeeded", "failed", "cancelled")
# Progress (step i of n) reaches a job's stored record at most this often; every change of
# status at once.
_PROGRESS_SAVE_INTERVAL_S = 1.0
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class _Job:
    record: VideoJob
    task: asyncio.Task | None = None
    uri: str | None = None  # the stored MP4, once succeeded
    saved_at: float = 0.0  # time.monotonic() when the record was last written

    def to_json(self) -> bytes:
        return json.dumps({"job": self.record.model_dump(mode="json"), "uri": self.uri}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "_Job":
        stored = json.loads(data)
        return cls(VideoJob.model_validate(stored["job"]), uri=stored["uri"])


@serve.deployment
class VideoJobs:
    """Every video job's record, and the task that drives it through the video stages.

    One replica (config enforces it), so every ingress replica sees the same jobs. Each
    record is also written whole to ``<output>/video_jobs/<id>.json`` on every change, so
    the jobs outlive the replica: a replacement reads a job it does not hold from storage, and
    one that was still queued or running there reads as failed ("interrupted"), its task
    having died with the old replica. At most ``max_running_jobs`` jobs run at once, the rest
    wait as ``queued``; memory keeps the last ``max_finished_jobs`` finished records, storage
    all of them.
    """

    def __init__(
        self,
        video: ServeVideoConfig,
        output: str,
        storage: StorageConfig,
        text_encoder: DeploymentHandle,
        denoiser: DeploymentHandle,
        vae_decode: DeploymentHandle,
    ) -> None:
        self.video = video
        self.output = output
        self.storage = Storage(storage)
        self.text_encoder = text_encoder
        self.denoiser = denoiser
        self.vae_decode = vae_decode
        self.running = asyncio.Semaphore(video.max_running_jobs)
        self.jobs: OrderedDict[str, _Job] = OrderedDict()
        # One writer thread: records land in the order they were written, also when the
        # task that wrote one was cancelled while waiting for it.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="video-job-records")

    async def shape_factors(self) -> tuple[int, int]:
        return await self.denoiser.shape_factors.remote()

    async def submit(self, body: VideoRequest, seed: int) -> VideoJob | None:
        """The new job, queued and stored; None when ``max_jobs`` are already queued or
        running."""
        active = sum(job.record.status not in _FINISHED for job in self.jobs.values())
        if active >= self.video.max_jobs:
            return None
        record = VideoJob(
            id=uuid.uuid4().hex,
            status="queued",
            num_steps=body.num_inference_steps,
            seed=seed,
            created_at=time.time(),
        )
        job = _Job(record)
        self.jobs[record.id] = job  # counts against max_jobs while it is being stored
        try:
            await self._save(job)
        except BaseException:
            del self.jobs[record.id]
            raise
        job.task = asyncio.create_task(self._run(job, body))
        self._forget_old()
        return record.model_copy()

    async def get(self, job_id: str) -> tuple[VideoJob, str | None] | None:
        """The record and the stored MP4's URI, or None for an unknown id."""
        job = self.jobs.get(job_id) or await self._load(job_id)
        return None if job is None else (job.record.model_copy(), job.uri)

    async def cancel(self, job_id: str) -> VideoJob | None:
        """Cancel a queued or running job (a running one stops between denoising steps); a
        finished one stays as it is. None for an unknown id."""
        job = self.jobs.get(job_id) or await self._load(job_id)
        if job is None:
            return None
        if job.record.status not in _FINISHED:
            job.record.status = "cancelled"
            job.record.finished_at = time.time()
            assert job.task is not None
            job.task.cancel()
            await self._save(job)
        return job.record.model_copy()

    async def stats(self) -> dict[str, int]:
        return dict(Counter(job.record.status for job in self.jobs.values()))

    async def _run(self, job: _Job, body: VideoRequest) -> None:
        record = job.record
        in_flight: list[Any] = []

        async def stage(name: str, response: Any) -> Any:
            start = time.perf_counter()
            in_flight[:] = [response]
            result = await response
            record.stage_seconds[name] = time.perf_counter() - start
            return result

        try:
            async with self.running:
                record.status = "running"
                record.started_at = time.time()
                await self._save(job)
                start = time.perf_counter()
                embeddings = await stage(
                    "text_encoder",
                    self.text_encoder.encode.remote(
                        body.prompt,
                        body.negative_prompt,
                        body.guidance_scale,
                        self.video.max_sequence_length,
                    ),
                )
                request = VideoDenoiseRequest(
                    embeddings=embeddings,
                    seed=record.seed,
                    height=body.height,
                    width=body.width,
                    num_frames=body.num_frames,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                )
                denoise_start = time.perf_counter()
                steps = self.denoiser.options(stream=True).denoise.remote(request)
                in_flight[:] = [steps]
                async for step, sample in steps:
                    record.step = step
                    latents = sample  # (C, F, h, w) with the last step, None before
                    await self._save(job, progress=True)
                record.stage_seconds["denoiser"] = time.perf_counter() - denoise_start
                mp4, record.nsfw_content_detected = await stage(
                    "vae_decode", self.vae_decode.mp4.remote(latents, body.fps)
                )
                uri = Storage.join(self.output, VIDEOS_FOLDER, f"{uuid.uuid4().hex}.mp4")
                store_start = time.perf_counter()
                await asyncio.to_thread(self.storage.write_bytes, uri, mp4)
                record.stage_seconds["store"] = time.perf_counter() - store_start
                record.stage_seconds["total"] = time.perf_counter() - start
                job.uri = uri
                record.status = "succeeded"
        except asyncio.CancelledError:  # by cancel(), which has stored the record
            for response in in_flight:
                response.cancel()
            self._forget_old()
            return
        except Exception as err:  # the job's failure is its record's, not this replica's
            record.status = "failed"
            record.error = f"{type(err).__name__}: {err}"
        record.finished_at = time.time()
        # Stored before it may be dropped from memory, so storage never holds a stale state
        # of a job this replica has forgotten.
        await self._save(job)
        self._forget_old()

    async def _save(self, job: _Job, progress: bool = False) -> None:
        """Write the job's record whole (readers see the old one or the new one); with
        ``progress``, only when the last write is ``_PROGRESS_SAVE_INTERVAL_S`` old."""
        now = time.monotonic()
        if progress and now - job.saved_at < _PROGRESS_SAVE_INTERVAL_S:
            return
        job.saved_at = now
        uri = Storage.join(self.output, VIDEO_JOBS_FOLDER, f"{job.record.id}.json")
        await asyncio.get_running_loop().run_in_executor(
            self.writer, self.storage.write_bytes, uri, job.to_json()
        )

    async def _load(self, job_id: str) -> _Job | None:
        """A job this replica does not hold, from storage; None when there is none. One
        stored as queued or running was interrupted: this replica never ran it."""
        if not _JOB_ID.match(job_id):
            return None
        uri = Storage.join(self.output, VIDEO_JOBS_FOLDER, f"{job_id}.json")
        if not await asyncio.to_thread(self.storage.exists, uri):
            return None
        job = _Job.from_json(await asyncio.to_thread(self.storage.read_bytes, uri))
        if job.record.status not in _FINISHED:
            job.record.status = "failed"
            job.record.error = "interrupted: the video_jobs replica running it stopped"
            job.record.finished_at = time.time()
            await self._save(job)
        self.jobs[job_id] = job
        self._forget_old()
        return job

    def _forget_old(self) -> None:
        finished = [key for key, job in self.jobs.items() if job.record.status in _FINISHED]
        for key in finished[: max(0, len(finished) - self.video.max_finished_jobs)]:
            del self.jobs[key]


# ---------------------------------------------------------------------------------------
# Ingress
# ---------------------------------------------------------------------------------------


def _authorize(request: Request) -> None:
    """Bearer API keys, when the server has any: 401 without a key, 403 with a wrong one.

    A FastAPI dependency, so it runs before the body is validated: an unauthenticated caller
    learns nothing about the API from validation errors.
    """
    digests: list[bytes] | None = request.app.state.api_key_digests
    if digests is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise HTTPException(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    digest = hashlib.sha256(key.strip().encode()).digest()
    # Compare every key, in constant time, so timing tells nothing about which is close.
    if not any([hmac.compare_digest(digest, known) for known in digests]):
        raise HTTPException(403, "invalid API key")


def _invalid(field: str, value: Any, message: str) -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the request field."""
    return RequestValidationError(
        [{"loc": ("body", field), "msg": message, "type": "value_error", "input": value}]
    )


class _CountRequests:
    """ASGI middleware: each request the ingress answers counts in its ``raygen_requests``
    metric by route and status; a streamed answer by how its stream ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            # The route tag is Serve's: the route the request matched.
            status = scope.get("state", {}).get("stream_status", status)
            scope["app"].state.requests_metric.inc(tags={"status": str(status)})


api.add_middleware(_CountRequests)


def _check_sides(
    height: int,
    width: int,
    multiple: int,
    max_height: int,
    max_width: int,
    invalid: Callable[[str, Any, str], RequestValidationError] = _invalid,
) -> None:
    """Image and video sides: multiples of the VAE downscale x patch size, within the limits."""
    for field, value, maximum in (("height", height, max_height), ("width", width, max_width)):
        if value < multiple or value % multiple:
            raise invalid(
                field, value, f"must be a multiple of {multiple} (VAE downscale x patch size)"
            )
        if value > maximum:
            raise invalid(field, value, f"must be at most {maximum}")


@dataclass
class _Run:
    """One request's progress: seconds per stage (into the stage histogram too), the stage
    calls still in flight (the ones a timeout cancels), and for a streaming caller its events:
    ``(event, data)`` for each stage's start and finish and each denoising step."""

    stage_seconds: dict[str, float]
    in_flight: set[DeploymentResponse | DeploymentResponseGenerator]
    stage_histogram: metrics.Histogram
    events: asyncio.Queue[tuple[str, dict[str, Any]] | None] | None = None
    stage: str | None = None  # the stage called last

    def emit(self, event: str, **data: Any) -> None:
        if self.events is not None:
            self.events.put_nowait((event, data))

    def started(self, stage: str) -> float:
        self.stage = stage
        self.emit("stage", stage=stage, status="started")
        return time.perf_counter()

    def finished(self, stage: str, start: float) -> None:
        seconds = time.perf_counter() - start
        self.stage_seconds[stage] = seconds
        self.stage_histogram.observe(seconds, tags={"stage": stage})
        self.emit("stage", stage=stage, status="finished", seconds=seconds)

    async def call(self, stage: str, *responses: DeploymentResponse) -> list[Any]:
        return await self._track(stage, responses, asyncio.gather(*responses))

    async def denoise(
        self, stage: str, handle: DeploymentHandle, requests: list[DenoiseRequest]
    ) -> list[torch.Tensor]:
        """Each request's latents from a denoiser stage. A streaming caller's requests go
        through the stage's streaming method (as video jobs follow theirs), with a step event
        each time every image has run one more step."""
        if self.events is None:
            return await self.call(stage, *(handle.denoise.remote(r) for r in requests))
        streams = [handle.options(stream=True).denoise_steps.remote(r) for r in requests]
        steps_done = [0] * len(streams)

        async def follow(index: int, stream: DeploymentResponseGenerator) -> torch.Tensor:
            async for done, num_steps, sample in stream:
                latents = sample  # (C, h, w) with the last item, None before
                before = min(steps_done)
                steps_done[index] = done
                if min(steps_done) > before:
                    self.emit("step", stage=stage, step=min(steps_done), num_steps=num_steps)
            return latents

        return await self._track(
            stage, streams, asyncio.gather(*(follow(i, s) for i, s in enumerate(streams)))
        )

    async def _track(
        self,
        stage: str,
        responses: Sequence[DeploymentResponse | DeploymentResponseGenerator],
        results: Awaitable[list[Any]],
    ) -> list[Any]:
        start = self.started(stage)
        self.in_flight.update(responses)
        values = await results
        # Only finished calls leave: on a timeout, the ones still listed get cancelled.
        self.in_flight.difference_update(responses)
        self.finished(stage, start)
        return list(values)


def _sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Routes, auth, validation and the prompt filter; drives a request through the stages."""

    def __init__(
        self,
        config: ServeConfig,
        api_key_digests: list[bytes] | None,
        text_encoder: DeploymentHandle,
        base: DeploymentHandle,
        refiner: DeploymentHandle | None,
        vae_decode: DeploymentHandle,
        super_resolution: list[DeploymentHandle],
        safety: DeploymentHandle,
        video_jobs: DeploymentHandle | None = None,
    ) -> None:
        self.config = config
        api.state.api_key_digests = api_key_digests
        self.prompt_filter = PromptFilter(config.safety.blocklist)
        self.storage = Storage(config.storage)
        self.text_encoder = text_encoder
        self.base = base
        self.refiner = refiner
        self.vae_decode = vae_decode
        self.super_resolution = super_resolution
        self.safety = safety
        self.video_jobs = video_jobs
        # Alongside Serve's own metrics (requests, latency per deployment), exported the same
        # way: Ray's metrics endpoint on each node, for Prometheus.
        self.stage_histogram = metrics.Histogram(
            "raygen_stage_seconds",
            description="Seconds an image request spent in each stage, and in all (total).",
            boundaries=_STAGE_SECONDS_BOUNDARIES,
            tag_keys=("stage",),
        )
        api.state.requests_metric = metrics.Counter(
            "raygen_requests",
            description="Requests the ingress answered, by route and HTTP status.",
            tag_keys=("route", "status"),
        )
        self._size_multiple: int | None = None
        self._video_shape_factors: tuple[int, int] | None = None

    def _stages(self) -> dict[str, DeploymentHandle]:
        stages = {"text_encoder": self.text_encoder, "base": self.base}
        if self.refiner is not None:
            stages["refiner"] = self.refiner
        stages["vae_decode"] = self.vae_decode
        for index, handle in enumerate(self.super_resolution, start=1):
            stages[f"super_resolution_{index}"] = handle
        stages["safety"] = self.safety
        if self.video_jobs is not None:
            stages["video_jobs"] = self.video_jobs
        return stages

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.config.model_name, "stages": list(self._stages())}

    @api.get("/v1/stats", dependencies=[Depends(_authorize)])
    async def stats(self) -> dict[str, Any]:
        """Per stage (the replica that answered): requests served, encoder cache hits and
        misses, the denoisers' batch sizes, steps run and batches stopped early."""
        stages = self._stages()
        results = await asyncio.gather(
            *(self._call(stage, handle.stats.remote()) for stage, handle in stages.items())
        )
        return dict(zip(stages, results, strict=True))

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
        dependencies=[Depends(_authorize)],
    )
    async def generate(
        self, body: GenerateRequest, request: Request
    ) -> GenerateResponse | StreamingResponse:
        """The images; with ``stream``, server-sent events (see ``_events``)."""
        seeds = await self._admit(body, {})
        if body.stream:
            return StreamingResponse(
                self._events(body, seeds, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        (images, flagged), stage_seconds = await self._within_time_limit(
            body, lambda run: self._images(body, seeds, request, run)
        )
        return self._generate_response(seeds, images, flagged, stage_seconds)

    def _generate_response(
        self,
        seeds: list[int],
        images: list[GeneratedImage],
        flagged: list[bool],
        stage_seconds: dict[str, float],
    ) -> GenerateResponse:
        return GenerateResponse(
            images=images,
            seed=seeds[0],
            seeds=seeds,
            model=self.config.model_name,
            nsfw_content_detected=flagged,
            stage_seconds=stage_seconds,
        )

    async def _events(
        self, body: GenerateRequest, seeds: list[int], request: Request
    ) -> AsyncIterator[str]:
        """A streaming ``/v1/generate``'s server-sent events: ``stage`` (``{stage, status:
        started|finished, seconds}``) and ``step`` (``{stage, step, num_steps}``: every image
        has run step ``step`` of the stage's ``num_steps``) as they happen, then ``result``
        (the JSON the route answers without ``stream``) or ``error`` (``{status, detail}``: the
        HTTP error the request would have got)."""
        events: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        work = asyncio.ensure_future(
            self._within_time_limit(
                body, lambda run: self._images(body, seeds, request, run), events
            )
        )
        work.add_done_callback(lambda _: events.put_nowait(None))  # after its last event
        status = 200
        try:
            while (event := await events.get()) is not None:
                yield _sse(*event)
            try:
                (images, flagged), stage_seconds = work.result()
            except HTTPException as err:
                status = err.status_code
                yield _sse("error", {"status": status, "detail": err.detail})
                return
            except Exception:
                logger.exception("a streaming /v1/generate request failed")
                status = 500
                yield _sse("error", {"status": status, "detail": "Internal Server Error"})
                return
            response = self._generate_response(seeds, images, flagged, stage_seconds)
            yield _sse("result", response.model_dump(mode="json"))
        finally:
            work.cancel()  # the client went away: the request's stage calls stop
            request.state.stream_status = status

    @api.post(
        "/v1/images/generations",
        response_model=ImageGenerationResponse,
        dependencies=[Depends(_authorize)],
    )
    async def images_generations(
        self, body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse:
        """OpenAI's image generation route, so the official ``openai`` client works."""
        width, height = (int(side) for side in body.size.split("x"))
        # Already validated field by field; the checks left (sizes, counts) are the server's
        # own, and name the OpenAI fields.
        native = GenerateRequest.model_construct(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            height=height,
            width=width,
            seed=body.seed,
            num_images_per_prompt=body.n,
            model=body.model,
            response_format=body.response_format,
        )
        fields = {"height": "size", "width": "size", "num_images_per_prompt": "n"}
        seeds = await self._admit(native, fields)
        (images, flagged), stage_seconds = await self._within_time_limit(
            native, lambda run: self._images(native, seeds, request, run)
        )
        return ImageGenerationResponse(
            created=int(time.time()),
            data=images,
            seed=seeds[0],
            seeds=seeds,
            nsfw_content_detected=flagged,
            stage_seconds=stage_seconds,
        )

    @api.get("/v1/files/{name}")
    async def file(self, name: str) -> Response:
        """An image or video stored for a URL response. No auth: the name is 128 random bits,
        so the URL itself is the capability (as a presigned S3 URL is)."""
        match = _FILE_NAME.match(name)
        if not match:
            raise HTTPException(404, "no such file")
        folder, media_type = _FILES[match.group(1)]
        uri = Storage.join(self.config.output, folder, name)
        try:
            data = await asyncio.to_thread(self.storage.read_bytes, uri)
        except ValueError:
            raise HTTPException(404, "no such file") from None
        return Response(data, media_type=media_type)

    # ---- video jobs -----------------------------------------------------------------

    @api.post(
        "/v1/videos",
        status_code=202,
        response_model=VideoJob,
        dependencies=[Depends(_authorize)],
    )
    async def create_video(self, body: VideoRequest) -> Any:
        """Queue a video job; poll ``GET /v1/videos/{id}`` for its progress and URL."""
        jobs = self._video_jobs()
        await self._validate_video(body)
        self._filter_prompt(body.prompt)
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        job = await jobs.submit.remote(body, seed)
        if job is None:
            return JSONResponse(
                {"detail": "too many video jobs queued; retry later"},
                status_code=503,
                headers={"Retry-After": f"{self.config.retry_after_s:g}"},
            )
        return job

    @api.get("/v1/videos/{job_id}", response_model=VideoJob, dependencies=[Depends(_authorize)])
    async def video(self, job_id: str, request: Request) -> VideoJob:
        """The job's status and progress (step of num_steps); once succeeded, the MP4's URL."""
        found = await self._video_jobs().get.remote(job_id)
        if found is None:
            raise HTTPException(404, "no such video job")
        job, uri = found
        if uri is not None:
            if is_s3(uri):
                job.url = await asyncio.to_thread(
                    self.storage.presigned_url, uri, self.config.url_expires_s
                )
            else:
                job.url = str(request.url_for("file", name=uri.rsplit("/", 1)[-1]))
        return job

    @api.delete("/v1/videos/{job_id}", response_model=VideoJob, dependencies=[Depends(_authorize)])
    async def cancel_video(self, job_id: str) -> VideoJob:
        """Cancel a queued or running job (a running one stops between denoising steps); a
        finished job is returned unchanged."""
        job = await self._video_jobs().cancel.remote(job_id)
        if job is None:
            raise HTTPException(404, "no such video job")
        return job

    def _video_jobs(self) -> DeploymentHandle:
        if self.video_jobs is None:
            raise HTTPException(404, "this server has no video model (config: video)")
        return self.video_jobs

    async def _validate_video(self, body: VideoRequest) -> None:
        """The checks that depend on this server: the video VAE's factors and the limits."""
        video = self.config.video
        assert video is not None and self.video_jobs is not None
        if self._video_shape_factors is None:
            self._video_shape_factors = await self.video_jobs.shape_factors.remote()
        multiple, temporal = self._video_shape_factors
        _check_sides(body.height, body.width, multiple, video.max_height, video.max_width)
        if (body.num_frames - 1) % temporal:
            raise _invalid(
                "num_frames",
                body.num_frames,
                f"num_frames - 1 must be a multiple of {temporal} (the VAE's temporal downscale)",
            )
        if body.num_frames > video.max_num_frames:
            raise _invalid("num_frames", body.num_frames, f"must be at most {video.max_num_frames}")

    async def pixels(self, body: GenerateRequest) -> dict[str, Any]:
        """Not a route: the float32 images (H, W, 3) in [0, 1] straight from the VAE, before
        the safety stage (so neither checked nor watermarked), for parity checks against
        diffusers and for trusted callers inside the cluster."""
        if body.upscale:
            raise ValueError("pixels() returns VAE output: upscale must be 0")
        seeds = await self._admit(body, {})
        images, stage_seconds = await self._within_time_limit(
            body, lambda run: self._run_stages(body, seeds, "float32", run)
        )
        return {"images": images, "seeds": seeds, "stage_seconds": stage_seconds}

    # ---- the graph ------------------------------------------------------------------

    async def _admit(self, body: GenerateRequest, fields: dict[str, str]) -> list[int]:
        """Validate against this server and run the prompt filter, before any model runs;
        returns the seed of each image. ``fields`` renames fields in 422s (OpenAI's names)."""
        await self._validate(body, fields)
        self._filter_prompt(body.prompt)
        num_images = body.num_images_per_prompt
        first = body.seed if body.seed is not None else random.randrange(2**63 - num_images)
        return [first + index for index in range(num_images)]

    def _filter_prompt(self, prompt: str) -> None:
        blocked = self.prompt_filter.match(prompt)
        if blocked is not None:
            raise HTTPException(
                400,
                {
                    "code": "prompt_blocked",
                    "field": "prompt",
                    "reason": f"the prompt contains the blocked term {blocked!r}",
                },
            )

    async def _within_time_limit(
        self,
        body: GenerateRequest,
        work: Callable[[_Run], Awaitable[Any]],
        events: asyncio.Queue[tuple[str, dict[str, Any]] | None] | None = None,
    ) -> tuple[Any, dict[str, float]]:
        """``work``'s result and the seconds in each stage, or a 504 once the request's time
        limit passes, with the stage calls in flight cancelled (a running batch stops once
        all its requests are) and no later stage started; a 503 with Retry-After, likewise,
        when a stage's replica dies under the request. ``events`` gets a streaming caller's
        stage and step events."""
        run = _Run(
            stage_seconds={},
            in_flight=set(),
            stage_histogram=self.stage_histogram,
            events=events,
        )
        timeout_s = body.timeout_s or self.config.request_timeout_s
        start = time.perf_counter()
        try:
            result = await asyncio.wait_for(work(run), timeout_s)
        except BaseException as err:
            # However the request ends early (its time limit, a dead replica, a failed
            # stage, a streaming client gone), none of its stage calls keeps running.
            for response in run.in_flight:
                response.cancel()
            if isinstance(err, TimeoutError):
                raise HTTPException(
                    504,
                    f"generation exceeded its time limit of {timeout_s:g} s and was cancelled",
                ) from None
            if isinstance(err, RayActorError):
                raise self._replica_failed(run.stage) from None
            raise
        run.stage_seconds["total"] = seconds = time.perf_counter() - start
        self.stage_histogram.observe(seconds, tags={"stage": "total"})
        return result, run.stage_seconds

    def _replica_failed(self, stage: str | None) -> HTTPException:
        # The replica running the call died (or cannot be reached). Serve routes later calls
        # elsewhere and replaces it; this call's work is lost, so the caller should retry, as
        # after any other 503.
        return HTTPException(
            503,
            f"a {stage} replica failed while running this request and is being replaced; "
            "retry later",
            {"Retry-After": f"{self.config.retry_after_s:g}"},
        )

    async def _call(self, stage: str, response: DeploymentResponse) -> Any:
        """A stage call outside a generation (its size factors, its stats): a dead replica
        is the same 503 as under a generation."""
        try:
            return await response
        except RayActorError:
            raise self._replica_failed(stage) from None

    async def _run_stages(
        self, body: GenerateRequest, seeds: list[int], output_type: str, run: _Run
    ) -> list[np.ndarray]:
        [embeddings] = await run.call(
            "text_encoder",
            self.text_encoder.encode.remote(
                EncodeItem(body.prompt, body.negative_prompt, self.config.max_sequence_length)
            ),
        )
        common = {
            "embeddings": embeddings,
            "guidance_scale": body.guidance_scale,
            "height": body.height,
            "width": body.width,
            "num_inference_steps": body.num_inference_steps,
        }
        handoff = body.denoising_end if body.refiner else None
        latents = await run.denoise(
            "base",
            self.base,
            [DenoiseRequest(**common, seed=seed, denoising_end=handoff) for seed in seeds],
        )
        if body.refiner:
            latents = await run.denoise(
                "refiner",
                self.refiner,
                [
                    DenoiseRequest(**common, seed=seed, denoising_start=handoff, latents=sample)
                    for seed, sample in zip(seeds, latents, strict=True)
                ],
            )
        [images] = await run.call("vae_decode", self.vae_decode.decode.remote(latents, output_type))
        for index, stage in enumerate(self.super_resolution[: body.upscale], start=1):
            [images] = await run.call(
                f"super_resolution_{index}",
                stage.upscale.remote(images, body.prompt, body.negative_prompt, seeds),
            )
        return images

    async def _images(
        self,
        body: GenerateRequest,
        seeds: list[int],
        request: Request,
        run: _Run,
    ) -> tuple[list[GeneratedImage], list[bool]]:
        """The stages, then safety check, watermark and PNG; inline base64 or a stored
        image's URL. Returns the images and which ones the safety check blacked out."""
        images = await self._run_stages(body, seeds, "uint8", run)
        [(pngs, flagged)] = await run.call("safety", self.safety.finish.remote(images))
        if body.response_format == "b64_json":
            return [
                GeneratedImage(b64_json=base64.b64encode(png).decode()) for png in pngs
            ], flagged
        start = run.started("store")
        stored = await asyncio.gather(*(self._store(png, request) for png in pngs))
        run.finished("store", start)
        return list(stored), flagged

    async def _store(self, png: bytes, request: Request) -> GeneratedImage:
        name = f"{uuid.uuid4().hex}.png"
        uri = Storage.join(self.config.output, IMAGES_FOLDER, name)
        await asyncio.to_thread(self.storage.write_bytes, uri, png)
        if is_s3(uri):
            url = await asyncio.to_thread(
                self.storage.presigned_url, uri, self.config.url_expires_s
            )
        else:
            url = str(request.url_for("file", name=name))
        return GeneratedImage(url=url)

    async def _validate(self, body: GenerateRequest, fields: dict[str, str]) -> None:
        """The checks that depend on this server: its sizes, stages, model name and limits."""
        config = self.config

        def invalid(field: str, value: Any, message: str) -> RequestValidationError:
            if field in fields:  # an OpenAI field that sets this one (size: height and width)
                return _invalid(fields[field], value, f"{field} {message}")
            return _invalid(field, value, message)

        if body.model is not None and body.model != config.model_name:
            raise invalid(
                "model", body.model, f"unknown model; this server serves {config.model_name!r}"
            )
        if self._size_multiple is None:
            self._size_multiple = await self._call("base", self.base.size_multiple.remote())
        multiple = self._size_multiple
        _check_sides(
            body.height, body.width, multiple, config.max_height, config.max_width, invalid
        )
        if body.num_images_per_prompt > config.max_images_per_request:
            raise invalid(
                "num_images_per_prompt",
                body.num_images_per_prompt,
                f"at most {config.max_images_per_request} images per request",
            )
        if body.refiner and self.refiner is None:
            raise invalid("refiner", body.refiner, "this server has no refiner stage")
        if body.upscale > len(self.super_resolution):
            raise invalid(
                "upscale",
                body.upscale,
                f"this server has {len(self.super_resolution)} super-resolution stages",
            )
        if body.timeout_s is not None and body.timeout_s > config.request_timeout_s:
            raise invalid(
                "timeout_s", body.timeout_s, f"must be at most {config.request_timeout_s:g}"
            )


# ---------------------------------------------------------------------------------------
# Building and running the graph
# ---------------------------------------------------------------------------------------


def deployment_options(
    name: str, settings: DeploymentSettings, retry_after_s: float
) -> dict[str, Any]:
    """A stage's Serve deployment options from its settings."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "health_check_period_s": settings.health_check_period_s,
        # Beyond the queue: 503 with Retry-After, whichever stage is full.
        "backpressure_config": {"status_code": 503, "retry_after_s": retry_after_s},
    }
    if settings.autoscaling is None:
        options["num_replicas"] = settings.num_replicas
    else:
        options["autoscaling_config"] = settings.autoscaling.model_dump(exclude_none=True)
    return options


def api_key_digests(config: ServeConfig) -> list[bytes] | None:
    """SHA-256 digests of the keys in ``$api_keys_env``; only digests leave this process."""
    if config.api_keys_env is None:
        return None
    keys = [key.strip() for key in os.environ.get(config.api_keys_env, "").split(",")]
    keys = [key for key in keys if key]
    if not keys:
        raise ConfigError(
            f"api_keys_env: environment variable {config.api_keys_env} is unset or holds no "
            "keys; set it to comma-separated keys, or set api_keys_env: null to serve without auth"
        )
    return [hashlib.sha256(key.encode()).digest() for key in keys]


def build_app(config: ServeConfig) -> serve.Application:
    """The whole graph, one deployment per stage, from one config."""
    config = _absolute_local_paths(config)
    deployments, retry = config.deployments, config.retry_after_s
    storage = config.storage

    def bind(cls: Any, name: str, settings: DeploymentSettings, *args: Any) -> Any:
        return cls.options(**deployment_options(name, settings, retry)).bind(*args)

    text_encoder = bind(
        TextEncoderStage,
        "text_encoder",
        deployments.text_encoder,
        config.bundle,
        storage,
        deployments.text_encoder,
        config.text_cache_size,
    )
    base = bind(DenoiserStage, "base", deployments.base, config.bundle, storage, deployments.base)
    refiner = None
    if config.refiner is not None:
        refiner = bind(
            DenoiserStage,
            "refiner",
            deployments.refiner,
            config.refiner,
            storage,
            deployments.refiner,
        )
    vae_decode = bind(VaeDecodeStage, "vae_decode", deployments.vae_decode, config.bundle, storage)
    super_resolution = [
        bind(
            SuperResolutionDeployment, f"super_resolution_{index}", stage.deployment, stage, storage
        )
        for index, stage in enumerate(config.super_resolution, start=1)
    ]
    safety = bind(SafetyStage, "safety", deployments.safety, config.safety, storage)
    video_jobs = None
    if config.video is not None:
        video, video_deployments = config.video, config.video.deployments
        video_jobs = bind(
            VideoJobs,
            "video_jobs",
            video_deployments.jobs,
            video,
            config.output,
            storage,
            bind(
                VideoTextEncoderStage,
                "video_text_encoder",
                video_deployments.text_encoder,
                video.bundle,
                storage,
            ),
            bind(
                VideoDenoiserStage,
                "video_denoiser",
                video_deployments.denoiser,
                video.bundle,
                storage,
            ),
            bind(
                VideoDecodeStage,
                "video_vae_decode",
                video_deployments.vae_decode,
                video.bundle,
                storage,
                config.safety,
            ),
        )
    return bind(
        Ingress,
        "ingress",
        deployments.ingress,
        config,
        api_key_digests(config),
        text_encoder,
        base,
        refiner,
        vae_decode,
        super_resolution,
        safety,
        video_jobs,
    )


def app_builder(args: dict[str, str]) -> serve.Application:
    """Entry for ``serve run flows.serve:app_builder config=serve.yaml [key.path=value ...]``
    and Serve config files (``import_path: flows.serve:app_builder``, ``args: {config: ...}``).
    """
    args = dict(args)
    path = args.pop("config", None)
    return build_app(
        load_config(ServeConfig, path, [f"{key}={value}" for key, value in args.items()])
    )


def run_serve(config: ServeConfig) -> None:
    """`raygen serve`: start the graph on Ray (local unless configured) and serve until
    interrupted."""
    init_ray(config.ray)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=True)


def _absolute_local_paths(config: ServeConfig) -> ServeConfig:
    """Local paths made absolute here, so replicas started in another folder find them."""

    def absolute(uri: str) -> str:
        return uri if is_s3(uri) else str(local_path(uri).absolute())

    def model(ref: ModelRef | None) -> ModelRef | None:
        return None if ref is None else ref.model_copy(update={"uri": absolute(ref.uri)})

    return config.model_copy(
        update={
            "bundle": model(config.bundle),
            "refiner": model(config.refiner),
            "super_resolution": [
                stage.model_copy(update={"model": model(stage.model)})
                for stage in config.super_resolution
            ],
            "safety": config.safety.model_copy(
                update={"image_checker": model(config.safety.image_checker)}
            ),
            "output": absolute(config.output),
            "video": None
            if config.video is None
            else config.video.model_copy(update={"bundle": model(config.video.bundle)}),
        }
    )


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------


def generate_image(
    url: str,
    request: GenerateRequest,
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> GenerateResponse:
    """Call a running server's ``POST /v1/generate``."""
    import json
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    call = urllib.request.Request(
        f"{url.rstrip('/')}/v1/generate",
        data=request.model_dump_json(exclude_none=True).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as response:
            return GenerateResponse.model_validate_json(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        try:
            detail = json.dumps(json.loads(detail)["detail"])
        except (ValueError, KeyError, TypeError):
            pass
        raise ServerError(err.code, detail) from None
    except urllib.error.URLError as err:
        raise ConnectionError(f"cannot reach raygen server at {url}: {err.reason}") from None


class ServerError(ValueError):
    """The server refused a request; ``status`` is its HTTP status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"server answered {status}: {detail}")
        self.status = status


def write_images(response: GenerateResponse, out: str) -> list[str]:
    """Write the response's images: ``out`` for one, ``stem-<i>.suffix`` for several."""
    root, suffix = os.path.splitext(out)
    paths = []
    for index, image in enumerate(response.images):
        if image.b64_json is None:
            raise ValueError("expected inline images (response_format b64_json)")
        path = out if len(response.images) == 1 else f"{root}-{index}{suffix or '.png'}"
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(image.b64_json))
        paths.append(path)
    return paths
