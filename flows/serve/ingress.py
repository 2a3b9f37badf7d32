"""The HTTP front: a FastAPI app built per ingress replica by ``build_api``, bearer auth,
the request checks and prompt filter, native, OpenAI-style and video-job routes. Image
requests go to the ``ImageGraph`` in one call; video jobs to ``VideoJobs``."""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime.
import asyncio
import base64
import hashlib
import hmac
import json
import logging
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.families import Multiples
from actors.prompt_filter import PromptFilter
from cluster.storage import Storage, is_s3
from flows.serve.checks import InvalidInput, check_inputs, served_model, video_image
from flows.serve.graph import ReplicaFailed, stage_names
from flows.serve.loras import AdapterRegistry
from flows.serve.messages import FinishedImages, Staged, VideoModel
from flows.serve.video_jobs import VIDEOS_FOLDER
from schemas.api import (
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    ImageGenerationRequest,
    ImageGenerationResponse,
    LoraList,
    ModelCard,
    ModelList,
    VideoJob,
    VideoRequest,
)
from schemas.config import ServeConfig
from schemas.errors import AdapterError

IMAGES_FOLDER = "images"
# Stored outputs by suffix: (folder under `output`, media type).
_FILES = {".png": (IMAGES_FOLDER, "image/png"), ".mp4": (VIDEOS_FOLDER, "video/mp4")}
_FILE_NAME = re.compile(r"^[0-9a-f]{32}(\.png|\.mp4)$")
# Buckets of the per-stage seconds histogram: a tiny model's stage on a CPU up to a large
# model's whole request.
_STAGE_SECONDS_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

logger = logging.getLogger("ray.serve")

Event = tuple[str, dict[str, Any]]


def build_api(ingress: "Ingress") -> FastAPI:
    """The routes of one ingress replica, each handing its request to ``ingress``."""
    api = FastAPI(
        title="raygen",
        description="Multi-stage text-to-image generation: native and OpenAI-compatible routes.",
    )
    api.add_middleware(_CountRequests, counter=ingress.requests_metric)
    # A dependency, so it runs before the body is validated: an unauthenticated caller
    # learns nothing about the API from validation errors.
    auth = [Depends(_bearer_auth(ingress.api_key_digests))]

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return ingress.health()

    @api.get("/v1/stats", dependencies=auth)
    async def stats() -> dict[str, Any]:
        """Per stage (the replica that answered): requests served, encoder cache hits and
        misses, the denoisers' batch sizes, steps run and batches stopped early; video jobs
        by status."""
        return await ingress.stats()

    @api.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
        dependencies=auth,
    )
    async def generate(
        body: GenerateRequest, request: Request
    ) -> GenerateResponse | StreamingResponse:
        """The images; with ``stream``, server-sent events (see ``Ingress.events``)."""
        return await ingress.generate(body, request)

    @api.get("/v1/models", response_model=ModelList, dependencies=auth)
    async def models() -> ModelList:
        """The image models a request's ``model`` may name, in OpenAI's format."""
        return ingress.models()

    @api.get("/v1/loras", response_model=LoraList, dependencies=auth)
    async def loras() -> LoraList:
        """The adapters a request may name in ``loras``: the registry's subfolders (one
        added there is listed within the config's ``loras.rescan_s``)."""
        return await ingress.loras()

    @api.post("/v1/images/generations", response_model=ImageGenerationResponse, dependencies=auth)
    async def images_generations(
        body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse:
        """OpenAI's image generation route, so the official ``openai`` client works."""
        return await ingress.images_generations(body, request)

    @api.get("/v1/files/{name}", name="file")
    async def file(name: str) -> Response:
        """An image or video stored for a URL response. No auth: the name is 128 random
        bits, so the URL itself is the capability (as a presigned S3 URL is)."""
        return await ingress.file(name)

    @api.post("/v1/videos", status_code=202, response_model=VideoJob, dependencies=auth)
    async def create_video(body: VideoRequest) -> Any:
        """Queue a video job; poll ``GET /v1/videos/{id}`` for its progress and URL."""
        return await ingress.create_video(body)

    @api.get("/v1/videos/{job_id}", response_model=VideoJob, dependencies=auth)
    async def video(job_id: str, request: Request) -> VideoJob:
        """The job's status and progress (step of num_steps); once succeeded, the MP4's
        URL."""
        return await ingress.video(job_id, request)

    @api.delete("/v1/videos/{job_id}", response_model=VideoJob, dependencies=auth)
    async def cancel_video(job_id: str) -> VideoJob:
        """Cancel a queued or running job (a running one stops between denoising steps); a
        finished job is returned unchanged."""
        return await ingress.cancel_video(job_id)

    return api


def _bearer_auth(digests: list[bytes] | None) -> Callable[[Request], None]:
    """Bearer API keys, when the server has any: 401 without a key, 403 with a wrong one."""

    def authorize(request: Request) -> None:
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

    return authorize


class _CountRequests:
    """ASGI middleware: each request the ingress answers counts in its ``raygen_requests``
    metric by route and status; a streamed answer by how its stream ended."""

    def __init__(self, app: ASGIApp, counter: metrics.Counter) -> None:
        self.app = app
        self.counter = counter

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
            self.counter.inc(tags={"status": str(status)})


def _invalid(err: InvalidInput, fields: dict[str, str]) -> RequestValidationError:
    """A 422 in FastAPI's own shape, naming the request field; ``fields`` renames fields
    (OpenAI's ``size`` sets height and width)."""
    name, message = err.field, err.message
    if name in fields:
        name, message = fields[name], f"{err.field} {message}"
    return RequestValidationError(
        [{"loc": ("body", name), "msg": message, "type": "value_error", "input": err.value}]
    )


def _adapter_error(err: BaseException | None) -> AdapterError | None:
    """The adapter error a stage raised, however many calls it came back through."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, AdapterError):
            return err
        err = err.cause if isinstance(err, RayTaskError) else (err.__cause__ or err.__context__)
    return None


def _sse(event: str, data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _cause(err: BaseException) -> BaseException:
    """The exception a replica raised, from the error its caller sees."""
    return err.cause if isinstance(err, RayTaskError) else err


@dataclass
class _Pending:
    """One image request in the ingress: its call to the graph (what a timeout cancels), its
    stage seconds, and for a streaming caller its events."""

    events: asyncio.Queue[Event | None] | None = None
    call: DeploymentResponse | DeploymentResponseGenerator | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def emit(self, event: str, **data: Any) -> None:
        if self.events is not None:
            self.events.put_nowait((event, data))


@serve.deployment
@serve.ingress()
class Ingress:
    """Auth, the request checks and the prompt filter, then the image graph or video jobs;
    stores URL outputs; the time limit, and the per-stage seconds metric."""

    def __init__(
        self,
        config: ServeConfig,
        api_key_digests: list[bytes] | None,
        graphs: dict[str, DeploymentHandle],
        video_jobs: DeploymentHandle | None = None,
    ) -> None:
        self.config = config
        self.api_key_digests = api_key_digests
        self.graphs = graphs  # per served model's name; the main one's is `graph`
        self.graph = graphs[config.model_name]
        self.video_jobs = video_jobs
        self.prompt_filter = PromptFilter(config.safety.blocklist)
        self.storage = Storage(config.storage)
        self.registry = (
            None if config.loras is None else AdapterRegistry(config.loras, self.storage)
        )
        # Alongside Serve's own metrics (requests, latency per deployment), exported the same
        # way: Ray's metrics endpoint on each node, for Prometheus.
        self.stage_histogram = metrics.Histogram(
            "raygen_stage_seconds",
            description="Seconds an image request spent in each stage, and in all (total).",
            boundaries=_STAGE_SECONDS_BOUNDARIES,
            tag_keys=("stage",),
        )
        self.requests_metric = metrics.Counter(
            "raygen_requests",
            description="Requests the ingress answered, by route and HTTP status.",
            tag_keys=("route", "status"),
        )
        # What each model fixes about shapes: asked of its stages once, then kept.
        self._image_multiples: dict[str, Multiples] = {}
        self._video_model: VideoModel | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    def health(self) -> dict[str, Any]:
        stages = stage_names(self.config)
        if self.video_jobs is not None:
            stages.append("video_jobs")
        return {
            "status": "ok",
            "model": self.config.model_name,
            "models": list(self.graphs),
            "stages": stages,
        }

    async def stats(self) -> dict[str, Any]:
        """The main model's stages' stats, each other model's under ``models``, and the video
        jobs'."""
        names = list(self.graphs)
        calls = [self._call(self.graphs[name].stats.remote()) for name in names]
        if self.video_jobs is not None:
            calls.append(self._call(self.video_jobs.stats.remote()))
        answers = await asyncio.gather(*calls)
        by_model = dict(zip(names, answers, strict=False))
        stats = by_model.pop(self.config.model_name)
        if by_model:
            stats["models"] = by_model
        if self.video_jobs is not None:
            stats["video_jobs"] = answers[-1]
        return stats

    def models(self) -> ModelList:
        """The served image models, as OpenAI's ``GET /v1/models`` lists them."""
        return ModelList(data=[ModelCard(id=name) for name in self.graphs])

    # ---- images ---------------------------------------------------------------------

    async def generate(
        self, body: GenerateRequest, request: Request
    ) -> GenerateResponse | StreamingResponse:
        seeds = await self._admit(body, {})
        if body.stream:
            return StreamingResponse(
                self.events(body, seeds, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        images, flagged, stage_seconds = await self._within_time_limit(
            body, lambda pending: self._images(body, seeds, request, pending)
        )
        return self._generate_response(body, seeds, images, flagged, stage_seconds)

    def _generate_response(
        self,
        body: GenerateRequest,
        seeds: list[int],
        images: list[GeneratedImage],
        flagged: list[bool],
        stage_seconds: dict[str, float],
    ) -> GenerateResponse:
        return GenerateResponse(
            images=images,
            seed=seeds[0],
            seeds=seeds,
            model=body.model or self.config.model_name,
            nsfw_content_detected=flagged,
            stage_seconds=stage_seconds,
        )

    async def events(
        self, body: GenerateRequest, seeds: list[int], request: Request
    ) -> AsyncIterator[str]:
        """A streaming ``/v1/generate``'s server-sent events: ``stage`` (``{stage, status:
        started|finished, seconds}``) and ``step`` (``{stage, step, num_steps}``: every image
        has run step ``step`` of the stage's ``num_steps``) as they happen, then ``result``
        (the JSON the route answers without ``stream``) or ``error`` (``{status, detail}``:
        the HTTP error the request would have got)."""
        events: asyncio.Queue[Event | None] = asyncio.Queue()
        work = asyncio.ensure_future(
            self._within_time_limit(
                body, lambda pending: self._images(body, seeds, request, pending), events
            )
        )
        work.add_done_callback(lambda _: events.put_nowait(None))  # after its last event
        status = 200
        try:
            while (event := await events.get()) is not None:
                yield _sse(*event)
            try:
                images, flagged, stage_seconds = work.result()
            except HTTPException as err:
                status = err.status_code
                yield _sse("error", {"status": status, "detail": err.detail})
                return
            except Exception:
                logger.exception("a streaming /v1/generate request failed")
                status = 500
                yield _sse("error", {"status": status, "detail": "Internal Server Error"})
                return
            response = self._generate_response(body, seeds, images, flagged, stage_seconds)
            yield _sse("result", response.model_dump(mode="json"))
        finally:
            work.cancel()  # the client went away: the request's stage calls stop
            request.state.stream_status = status

    async def images_generations(
        self, body: ImageGenerationRequest, request: Request
    ) -> ImageGenerationResponse:
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
            loras=body.loras,
        )
        fields = {"height": "size", "width": "size", "num_images_per_prompt": "n"}
        seeds = await self._admit(native, fields)
        images, flagged, stage_seconds = await self._within_time_limit(
            native, lambda pending: self._images(native, seeds, request, pending)
        )
        return ImageGenerationResponse(
            created=int(time.time()),
            data=images,
            seed=seeds[0],
            seeds=seeds,
            nsfw_content_detected=flagged,
            stage_seconds=stage_seconds,
        )

    async def loras(self) -> LoraList:
        if self.registry is None:
            raise HTTPException(404, "this server serves no adapters (config: loras)")
        return LoraList(loras=await asyncio.to_thread(self.registry.infos))

    async def file(self, name: str) -> Response:
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

    async def _admit(self, body: GenerateRequest, fields: dict[str, str]) -> list[int]:
        """Check the request against this server and run the prompt filter, before any model
        runs; returns the seed of each image. ``fields`` renames fields in 422s."""
        try:
            model = served_model(body, self.config)
            if model.name not in self._image_multiples:
                graph = self.graphs[model.name]
                self._image_multiples[model.name] = await self._call(graph.multiples.remote())
            check_inputs(body, self.config, self._image_multiples[model.name])
        except InvalidInput as err:
            raise _invalid(err, fields) from None
        if body.loras:
            assert self.registry is not None  # check_inputs refused loras without one
            names = [lora.name for lora in body.loras]
            missing = await asyncio.to_thread(self.registry.missing, names)
            if missing:
                raise HTTPException(
                    404,
                    f"unknown adapter {missing[0]!r}: not in the registry (GET /v1/loras lists "
                    "the adapters)",
                )
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

    async def _images(
        self, body: GenerateRequest, seeds: list[int], request: Request, pending: _Pending
    ) -> tuple[list[GeneratedImage], list[bool]]:
        """The graph's checked, watermarked PNGs, inline base64 or a stored image's URL, and
        which ones the safety check blacked out. A streaming request follows the graph's
        events."""
        graph = self.graphs[body.model or self.config.model_name]
        if pending.events is None:
            pending.call = graph.remote(body, seeds)
            staged: Staged = await pending.call
        else:
            pending.call = graph.options(stream=True).events.remote(body, seeds)
            async for event, data in pending.call:
                if event == "result":
                    staged = data["staged"]
                else:
                    pending.emit(event, **data)
        pending.stage_seconds.update(staged.seconds)
        finished: FinishedImages = staged.value
        if body.response_format == "b64_json":
            images = [
                GeneratedImage(b64_json=base64.b64encode(png).decode()) for png in finished.pngs
            ]
            return images, finished.flagged
        pending.emit("stage", stage="store", status="started")
        start = time.perf_counter()
        stored = await asyncio.gather(*(self._store(png, request) for png in finished.pngs))
        pending.stage_seconds["store"] = seconds = time.perf_counter() - start
        pending.emit("stage", stage="store", status="finished", seconds=seconds)
        return list(stored), finished.flagged

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

    async def _within_time_limit(
        self,
        body: GenerateRequest,
        work: Callable[[_Pending], Awaitable[tuple[Any, list[bool]]]],
        events: asyncio.Queue[Event | None] | None = None,
    ) -> tuple[Any, list[bool], dict[str, float]]:
        """``work``'s result and the seconds in each stage (each stage's own, into the stage
        histogram too), or a 504 once the request's time limit passes, with its graph call
        cancelled (the graph cancels its stage calls; a running batch stops once all its
        requests are); a 503 with Retry-After, likewise, when a stage's replica dies under
        the request."""
        pending = _Pending(events=events)
        timeout_s = body.timeout_s or self.config.request_timeout_s
        start = time.perf_counter()
        try:
            images, flagged = await asyncio.wait_for(work(pending), timeout_s)
        except BaseException as err:
            if pending.call is not None:
                pending.call.cancel()
            if isinstance(err, TimeoutError):
                raise HTTPException(
                    504,
                    f"generation exceeded its time limit of {timeout_s:g} s and was cancelled",
                ) from None
            if isinstance(_cause(err), ReplicaFailed):
                raise self._replica_failed(_cause(err).stage) from None
            if (adapter := _adapter_error(err)) is not None:
                # Found by the replica that loads it: gone from the registry since the
                # request was admitted (404), or made for another base (422, in FastAPI's
                # shape, which a stream's error event carries too).
                detail: Any = str(adapter)
                if adapter.status == 422:
                    names = [lora.name for lora in body.loras]
                    detail = [
                        {
                            "loc": ["body", "loras"],
                            "msg": detail,
                            "type": "value_error",
                            "input": names,
                        }
                    ]
                raise HTTPException(adapter.status, detail) from None
            if isinstance(err, RayActorError):
                raise self._replica_failed("graph") from None
            raise
        seconds = pending.stage_seconds
        seconds["total"] = time.perf_counter() - start
        for stage, spent in seconds.items():
            self.stage_histogram.observe(spent, tags={"stage": stage})
        return images, flagged, seconds

    def _replica_failed(self, stage: str) -> HTTPException:
        # The replica running the call died (or cannot be reached). Serve routes later calls
        # elsewhere and replaces it; this call's work is lost, so the caller should retry, as
        # after any other 503.
        return HTTPException(
            503,
            f"a {stage} replica failed while running this request and is being replaced; "
            "retry later",
            {"Retry-After": f"{self.config.retry_after_s:g}"},
        )

    async def _call(self, response: DeploymentResponse) -> Any:
        """A call outside a generation (size factors, stats): a dead replica is the same 503
        as under a generation."""
        try:
            return await response
        except (ReplicaFailed, RayActorError) as err:
            stage = _cause(err).stage if isinstance(_cause(err), ReplicaFailed) else "graph"
            raise self._replica_failed(stage) from None

    # ---- video jobs -----------------------------------------------------------------

    async def create_video(self, body: VideoRequest) -> Any:
        jobs = self._video_jobs()
        if self._video_model is None:
            self._video_model = await self._call(jobs.model.remote())
        model = self._video_model
        try:
            check_inputs(body, self.config, model.multiples)
            image = video_image(body, model.takes_image, model.pipeline)
        except InvalidInput as err:
            raise _invalid(err, {}) from None
        self._filter_prompt(body.prompt)
        seed = body.seed if body.seed is not None else random.randrange(2**63)
        # The image goes on decoded; its base64 text is not carried a second time.
        job = await jobs.submit.remote(body.model_copy(update={"image": None}), seed, image)
        if job is None:
            return JSONResponse(
                {"detail": "too many video jobs queued; retry later"},
                status_code=503,
                headers={"Retry-After": f"{self.config.retry_after_s:g}"},
            )
        return job

    async def video(self, job_id: str, request: Request) -> VideoJob:
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

    async def cancel_video(self, job_id: str) -> VideoJob:
        job = await self._video_jobs().cancel.remote(job_id)
        if job is None:
            raise HTTPException(404, "no such video job")
        return job

    def _video_jobs(self) -> DeploymentHandle:
        if self.video_jobs is None:
            raise HTTPException(404, "this server has no video model (config: video)")
        return self.video_jobs
