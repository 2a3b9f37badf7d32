"""The image graph: one request through the stages, encode -> denoise -> refine -> decode ->
upscale -> finish.

Each stage call takes the previous stage's ``DeploymentResponse`` as its argument, unawaited:
Serve hands the result to the next stage's replica through Ray's object store, so latents and
images never come back through the graph, and every call is routed before the first one
finishes. Only the last stage's result is awaited; it carries each stage's own seconds
(``Staged``). A streaming caller wants each stage's end and each denoising step as they
happen, so for it every stage is awaited in turn and the denoisers stream their steps.
"""

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

from actors.families import Multiples
from flows.serve.loras import adapter_set_key
from flows.serve.messages import DenoiseSpec, EncodeItem, Staged
from schemas.api import GenerateRequest
from schemas.config import ServeConfig

Event = tuple[str, dict[str, Any]]  # (SSE event name, its data)
# How long a failed chain's calls get to show their own outcome when the graph looks for
# the one that failed first.
_SETTLED_S = 0.2
# A Serve replica actor's name: SERVE_REPLICA::<app>#<deployment>#<replica id>. Serve reports a
# call whose argument came from a dead replica as an upstream crash, with Ray's
# ActorDiedError (which names the dead actor) as its cause.
_REPLICA_NAME = re.compile(r"SERVE_REPLICA::[^#\s]+#([^#\s]+)#")


class ReplicaFailed(Exception):
    """A stage's replica died (or could not be reached) while running this request."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"a {stage} replica failed while running this request")
        self.stage = stage

    def __reduce__(self) -> tuple[Any, ...]:
        return ReplicaFailed, (self.stage,)


def stage_names(config: ServeConfig) -> list[str]:
    """The image stages of a server with this config, in graph order."""
    names = ["text_encoder", "base"]
    if config.refiner is not None:
        names.append("refiner")
    names.append("vae_decode")
    names += [f"super_resolution_{i}" for i in range(1, len(config.super_resolution) + 1)]
    names.append("safety")
    return names


@dataclass
class _Calls:
    """One request's stage calls, in graph order; with ``events``, a streaming request's
    stage and step events."""

    events: asyncio.Queue[Event | None] | None = None
    calls: list[tuple[str, DeploymentResponse | DeploymentResponseGenerator]] = field(
        default_factory=list
    )

    def emit(self, event: str, **data: Any) -> None:
        if self.events is not None:
            self.events.put_nowait((event, data))

    async def stage(self, name: str, response: DeploymentResponse) -> Any:
        """The response itself, to pass on; a streaming request's ``Staged`` result."""
        self.calls.append((name, response))
        if self.events is None:
            return response
        self.emit("stage", stage=name, status="started")
        staged = await self._awaited(name, response)
        # The replica's own name for it: another model's stages are `<stage>_<model>`.
        self.emit("stage", stage=name, status="finished", seconds=staged.seconds[staged.stage])
        return staged

    async def denoise(
        self,
        name: str,
        handle: DeploymentHandle,
        specs: list[DenoiseSpec],
        embeddings: Any,
        latents: list[Any] | None = None,
    ) -> list[Any]:
        """One denoiser call per image. A streaming request's go through the stage's
        streaming method, with a step event each time every image has run one more step."""
        latents = latents or [None] * len(specs)
        if self.events is None:
            return [
                await self.stage(name, handle.denoise.remote(spec, embeddings, sample))
                for spec, sample in zip(specs, latents, strict=True)
            ]
        streams = [
            handle.options(stream=True).denoise_steps.remote(spec, embeddings, sample)
            for spec, sample in zip(specs, latents, strict=True)
        ]
        self.calls += [(name, stream) for stream in streams]
        steps_done = [0] * len(streams)

        async def follow(index: int, stream: DeploymentResponseGenerator) -> Staged:
            async for done, num_steps, staged in stream:
                result = staged  # latents (C, h, w) with the last item, None before
                before = min(steps_done)
                steps_done[index] = done
                if min(steps_done) > before:
                    self.emit("step", stage=name, step=min(steps_done), num_steps=num_steps)
            return result

        self.emit("stage", stage=name, status="started")
        staged = await self._awaited(
            name, asyncio.gather(*(follow(i, s) for i, s in enumerate(streams)))
        )
        seconds = max(sample.seconds[sample.stage] for sample in staged)
        self.emit("stage", stage=name, status="finished", seconds=seconds)
        return staged

    async def result(self, last: Any) -> Staged:
        """The last stage's result; when it failed, a dead replica is named by its stage."""
        if self.events is not None:
            return last
        try:
            return await self._unless_a_call_fails(last)
        except ReplicaFailed:
            raise  # named already
        except Exception as err:
            stage = _dead_stage(err) or await self._first_failed()
            if stage is not None:
                raise ReplicaFailed(stage) from None
            raise

    async def _unless_a_call_fails(self, last: DeploymentResponse) -> Any:
        """``last``'s result, or the first stage call's actor error. A replica lost with its
        node fails its own call within a second or two (Ray finds the actor unavailable), but
        Serve can keep retrying the next stage's call, which takes the lost result as its
        argument, until the request's time limit: the caller would get a 504 then instead of
        a 503 now. (Watching a call fetches its result here too: a copy of each stage's
        output, megabytes for a decoded image, against seconds of denoising.)"""
        watched = {
            asyncio.ensure_future(_settled(response)): name
            for name, response in self.calls
            if response is not last
        }
        final = asyncio.ensure_future(_settled(last))
        pending: set[asyncio.Future[Any]] = {final, *watched}
        for watch in pending:
            # Left to end by themselves, never cancelled: cancelling a task that awaits a
            # response cancels the response's own future, which the chain (and the search
            # for the failed stage) still awaits. When the request fails, ``_run`` cancels
            # the calls and these end. Their errors are read here.
            watch.add_done_callback(lambda done: done.cancelled() or done.exception())
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if final in done:
                return final.result()
            for call in done:
                if isinstance(call.exception(), RayActorError):
                    raise ReplicaFailed(watched[call])

    async def _awaited(self, name: str, awaitable: Any) -> Any:
        try:
            return await awaitable
        except RayActorError:
            raise ReplicaFailed(name) from None

    async def _first_failed(self) -> str | None:
        """The stage whose replica died, if that is what failed the chain: the first call
        in graph order that failed (the ones after it failed for want of its result)."""
        for name, response in self.calls:
            try:
                # A call that has not settled by now (another image's, in parallel) is not
                # what failed: the failure came through the calls before it.
                await asyncio.wait_for(_settled(response), _SETTLED_S)
            except TimeoutError:
                continue
            except RayActorError:
                return name
            except Exception:
                return None
        return None


@serve.deployment
class ImageGraph:
    """A request through the image stages. ``__call__`` returns the last stage's ``Staged``
    result; ``events`` streams a request's stage and step events, then that result."""

    def __init__(
        self,
        max_sequence_length: int,
        text_encoder: DeploymentHandle,
        base: DeploymentHandle,
        refiner: DeploymentHandle | None,
        vae_decode: DeploymentHandle,
        super_resolution: list[DeploymentHandle],
        safety: DeploymentHandle,
    ) -> None:
        self.max_sequence_length = max_sequence_length
        self.text_encoder = text_encoder
        self.base = base
        self.refiner = refiner
        self.vae_decode = vae_decode
        self.super_resolution = super_resolution
        self.safety = safety
        self._multiples: Multiples | None = None
        self._refiner_encodes: bool | None = None

    async def __call__(
        self, body: GenerateRequest, seeds: list[int], output_type: str = "uint8"
    ) -> Staged:
        """The request's images, one per seed: ``FinishedImages`` (checked, watermarked
        PNGs) for ``uint8``; for ``float32``, the (H, W, 3) images in [0, 1] straight from the
        VAE (neither upscaled, checked nor watermarked: for parity checks against diffusers
        and trusted callers inside the cluster)."""
        return await self._run(_Calls(), body, seeds, output_type)

    async def events(self, body: GenerateRequest, seeds: list[int]) -> AsyncIterator[Event]:
        """``(event, data)``: ``stage`` (``{stage, status: started|finished, seconds}``) and
        ``step`` (``{stage, step, num_steps}``: every image has run step ``step``) as they
        happen, then ``("result", {"staged": Staged})``."""
        calls = _Calls(events=asyncio.Queue())
        work = asyncio.ensure_future(self._run(calls, body, seeds, "uint8"))
        work.add_done_callback(lambda _: calls.events.put_nowait(None))  # after its last event
        try:
            while (event := await calls.events.get()) is not None:
                yield event
            yield "result", {"staged": work.result()}
        finally:
            work.cancel()  # the caller went away: the request's stage calls stop

    async def _run(
        self, calls: _Calls, body: GenerateRequest, seeds: list[int], output_type: str
    ) -> Staged:
        try:
            return await self._generate(calls, body, seeds, output_type)
        except BaseException:
            # However the request ends early (its time limit, a dead replica, a failed
            # stage, a streaming client gone), none of its stage calls keeps running.
            for _, response in calls.calls:
                with contextlib.suppress(Exception):
                    # Serve's cancel re-raises a call's own failure (a dead upstream
                    # replica): that call is over already, and the request's error is
                    # the one to report.
                    response.cancel()
            raise

    async def _generate(
        self, calls: _Calls, body: GenerateRequest, seeds: list[int], output_type: str
    ) -> Staged:
        if output_type != "uint8" and body.upscale:
            raise ValueError("float32 output is the VAE's: upscale must be 0")
        texts = EncodeItem(body.prompt, body.negative_prompt, self.max_sequence_length)
        embeddings = await calls.stage("text_encoder", self.text_encoder.encode.remote(texts))
        refiner_embeddings = embeddings
        if body.refiner and await self._refiner_encodes_prompts():
            # Its own embeddings (SDXL's refiner: CLIP-G's alone), encoded while the base runs.
            refiner_embeddings = await calls.stage(
                "refiner_text_encoder", self.refiner.encode.remote(texts)
            )
        handoff = body.denoising_end if body.refiner else None
        # The adapters adapt the base: a refiner is another model, which they were not made for.
        adapters = tuple(sorted((lora.name, lora.scale) for lora in body.loras))
        base = self.base
        if adapters:
            # To a base replica that holds this set, if one does (Serve's model multiplexing).
            key = adapter_set_key([name for name, _ in adapters])
            base = self.base.options(multiplexed_model_id=key)
        specs = [
            DenoiseSpec(
                seed=seed,
                guidance_scale=body.guidance_scale,
                height=body.height,
                width=body.width,
                num_inference_steps=body.num_inference_steps,
                denoising_end=handoff,
                adapters=adapters,
            )
            for seed in seeds
        ]
        latents = await calls.denoise("base", base, specs, embeddings)
        if body.refiner:
            specs = [
                replace(spec, denoising_start=handoff, denoising_end=None, adapters=())
                for spec in specs
            ]
            latents = await calls.denoise(
                "refiner", self.refiner, specs, refiner_embeddings, latents
            )
        images = await calls.stage(
            "vae_decode", self.vae_decode.decode.remote(output_type, *latents)
        )
        for index, stage in enumerate(self.super_resolution[: body.upscale], start=1):
            images = await calls.stage(
                f"super_resolution_{index}",
                stage.upscale.remote(images, body.prompt, body.negative_prompt, seeds),
            )
        if output_type == "uint8":
            images = await calls.stage("safety", self.safety.finish.remote(images))
        return await calls.result(images)

    async def multiples(self) -> Multiples:
        """What the base's bundle fixes about image sizes."""
        if self._multiples is None:
            self._multiples = await _named("base", self.base.multiples.remote())
        return self._multiples

    async def _refiner_encodes_prompts(self) -> bool:
        """Whether the refiner encodes the texts itself (asked once, then kept)."""
        if self._refiner_encodes is None:
            self._refiner_encodes = await _named("refiner", self.refiner.encodes_prompts.remote())
        return self._refiner_encodes

    async def stats(self) -> dict[str, Any]:
        """Per stage (the replica that answered): requests served, encoder cache hits and
        misses, the denoisers' batch sizes, steps run and batches stopped early."""
        stages = {"text_encoder": self.text_encoder, "base": self.base}
        if self.refiner is not None:
            stages["refiner"] = self.refiner
        stages["vae_decode"] = self.vae_decode
        for index, handle in enumerate(self.super_resolution, start=1):
            stages[f"super_resolution_{index}"] = handle
        stages["safety"] = self.safety
        results = await asyncio.gather(
            *(_named(name, handle.stats.remote()) for name, handle in stages.items())
        )
        return dict(zip(stages, results, strict=True))


def _dead_stage(err: BaseException | None) -> str | None:
    """The stage whose replica died, named by the actor error behind ``err``, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # Serve raises its upstream-crash error inside the handler of the actor error, so
        # the actor error is its context; the message quotes the dead actor's name too.
        upstream = isinstance(err, RayServeException) and "upstream actor died" in str(err)
        if (isinstance(err, RayActorError) or upstream) and (
            match := _REPLICA_NAME.search(str(err))
        ):
            return match.group(1)
        err = err.__cause__ or err.__context__
    return None


async def _settled(response: DeploymentResponse) -> Any:
    return await response


async def _named(stage: str, response: DeploymentResponse) -> Any:
    """A stage call outside a generation: a dead replica is named as under a generation."""
    try:
        return await response
    except RayActorError:
        raise ReplicaFailed(stage) from None
