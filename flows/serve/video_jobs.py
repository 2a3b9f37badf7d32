"""Video as asynchronous jobs: the ``VideoJobs`` deployment (every job's record, and the task
that drives each job through the video stages) and the records it stores.

    POST /v1/videos -> VideoJobs.submit: queued, stored
      -> video_text_encoder (UMT5)
      -> video_denoiser: the input image's encoding (image-to-video), then the Wan DiT
         (progress per step)
      -> video_vae_decode (Wan VAE, safety check and watermark on every frame, MP4)
      -> storage (the MP4, and the job's record as JSON, so jobs outlive the replica)
"""

import asyncio
import json
import re
import time
import uuid
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.storage import Storage
from flows.serve.messages import VideoDenoiseSpec, VideoModel
from schemas.api import VideoJob, VideoRequest
from schemas.config import ServeVideoConfig, StorageConfig

VIDEOS_FOLDER = "videos"
VIDEO_JOBS_FOLDER = "video_jobs"  # one JSON record per job

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

    async def model(self) -> VideoModel:
        return await self.denoiser.model.remote()

    async def submit(
        self, body: VideoRequest, seed: int, image: Image.Image | None = None
    ) -> VideoJob | None:
        """The new job, queued and stored; None when ``max_jobs`` are already queued or
        running. ``image``: the request's input image, decoded (image-to-video)."""
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
        job.task = asyncio.create_task(self._run(job, body, image))
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

    async def _run(self, job: _Job, body: VideoRequest, image: Image.Image | None) -> None:
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
                conditioning = None
                if image is not None:
                    conditioning = await stage(
                        "image_encoder",
                        self.denoiser.encode_image.remote(
                            image, body.height, body.width, body.num_frames
                        ),
                    )
                spec = VideoDenoiseSpec(
                    seed=record.seed,
                    height=body.height,
                    width=body.width,
                    num_frames=body.num_frames,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                )
                denoise_start = time.perf_counter()
                steps = self.denoiser.options(stream=True).denoise.remote(
                    spec, embeddings, conditioning
                )
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
