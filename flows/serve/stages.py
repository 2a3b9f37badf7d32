"""The image stages: thin Serve deployments over ``actors/generation.py`` classes, one per role
(the safety stage is in safety.py, the video stages in video_stages.py, so each replica
imports only the models it runs).

An image stage takes and returns a `Staged` value (``messages.py``), so the graph can pass a
stage's response straight on to the next stage's call and still report every stage's seconds.
"""

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from actors.families import Multiples
from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, Upscaler, VaeDecoder
from cluster.storage import Storage
from flows.serve.checks import check_refiner, same_text_encoders
from flows.serve.loras import AdapterRegistry, adapter_set_key, adapter_set_names
from flows.serve.messages import DenoiseSpec, EncodeItem, Staged
from flows.serve.replica import deployment_name, local_bundle, torch_dtype
from schemas.config import (
    DeploymentSettings,
    LoraServingConfig,
    ModelRef,
    StorageConfig,
    SuperResolutionStage,
)
from schemas.errors import AdapterError


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
        self.name = deployment_name()
        self.encoder = PromptEncoder(
            local_bundle(model, storage),
            device=model.device,
            dtype=torch_dtype(model),
            cache_size=cache_size,
        )
        self._encode_batch.set_max_batch_size(settings.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.num_requests = 0

    async def encode(self, item: EncodeItem) -> Staged:
        """The item's ``PromptEmbeddings``."""
        start = time.perf_counter()
        return Staged.after(await self._encode_batch(item), (), self.name, start)

    @serve.batch
    async def _encode_batch(self, items: list[EncodeItem]) -> list[Any]:
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


class _HeldAdapters:
    """An adapter set in Serve's multiplexed-model cache of a denoiser replica. Serve calls
    ``__del__`` when it evicts the set (least recently used); its adapters go once no other
    held set uses them."""

    def __init__(self, denoiser: Denoiser, names: list[str]) -> None:
        self.denoiser = denoiser
        self.names = names
        self._released = False

    def __del__(self) -> None:
        if not self._released:  # Serve's call, then the garbage collector's
            self._released = True
            self.denoiser.release_adapters(self.names)


@serve.deployment
class DenoiserStage:
    """The base DiT or the refiner: concurrent requests that share (height, width, steps,
    sequence length) denoise together, one transformer forward per step for all of them and
    both halves of their classifier-free guidance.

    ``denoise`` returns a request's latents; ``denoise_steps`` streams its progress first, as
    the video denoiser does. A call cancelled while its batch runs (Serve cancels the
    caller's coroutine, not the batch) marks its request; a batch stops between steps once
    every request in it is marked, so a timed-out request leaves no work running.

    With ``loras``, a request may name adapters from the registry. A replica holds up to
    ``max_per_replica`` adapter sets through Serve's model multiplexing, keyed by the set
    (the graph calls with that key as the multiplexed model id, so Serve routes the request
    to a replica that holds its set); the least recently used set goes when another comes.
    Serve splits batches by that id, and a batch's requests share their scales too.
    """

    def __init__(
        self,
        model: ModelRef,
        storage: StorageConfig,
        settings: DeploymentSettings,
        loras: LoraServingConfig | None = None,
        base: tuple[ModelRef, str] | None = None,
        text_cache_size: int = 1024,
    ) -> None:
        self.name = deployment_name()
        bundle_dir = local_bundle(model, storage)
        self.encoder: PromptEncoder | None = None
        if base is not None:
            # A refiner: refused before loading unless it continues its base's latent space
            # (the config field names it). `raygen serve` checked it before starting too.
            check_refiner(base[0], model, Storage(storage), base[1])
            if not same_text_encoders(base[0], model, Storage(storage)):
                # It reads other embeddings than its base's (SDXL's refiner: CLIP-G's alone):
                # it holds its own text encoders beside its denoiser, as its pipeline does.
                self.encoder = PromptEncoder(
                    bundle_dir, model.device, torch_dtype(model), text_cache_size
                )
        self.denoiser = Denoiser(bundle_dir, device=model.device, dtype=torch_dtype(model))
        self.registry = None if loras is None else AdapterRegistry(loras, Storage(storage))
        self._held = None
        if loras is not None:

            async def hold(key: str) -> _HeldAdapters:
                return await self._hold(key)

            # Wrapped here, not decorated: the number of sets is the config's.
            self._held = serve.multiplexed(max_num_models_per_replica=loras.max_per_replica)(hold)
        self._denoise_batch.set_max_batch_size(settings.max_batch_size)
        self._denoise_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.num_requests = 0
        self.num_encoded = 0  # texts encoded by a refiner's own text encoders
        self.batch_sizes: Counter[int] = Counter()  # requests per call -> calls
        self.num_steps = 0  # steps run, one per step of a call whatever its batch size
        self.num_stopped = 0  # calls stopped early: every request in them was cancelled

    async def multiples(self) -> Multiples:
        """What the bundle fixes about image sizes (its family's multiples)."""
        return self.denoiser.multiples

    async def encodes_prompts(self) -> bool:
        """Whether this stage encodes its requests' texts (``encode``) instead of reading the
        base's embeddings: a refiner with text encoders of its own."""
        return self.encoder is not None

    async def encode(self, item: EncodeItem) -> Staged:
        """The item's ``PromptEmbeddings`` from this refiner's own text encoders."""
        assert self.encoder is not None, f"{self.name} reads its base's embeddings"
        start = time.perf_counter()
        self.num_encoded += 1
        [embeddings] = await asyncio.to_thread(
            self.encoder.encode, [item.prompt], [item.negative_prompt], item.max_sequence_length
        )
        # Its seconds as a stage of their own: refiner_text_encoder[_<model>].
        name = self.name.replace("refiner", "refiner_text_encoder", 1)
        return Staged.after(embeddings, (), name, start)

    async def _hold(self, key: str) -> _HeldAdapters:
        assert self.registry is not None
        names = adapter_set_names(key)
        dirs = {name: await asyncio.to_thread(self.registry.local_dir, name) for name in names}
        await asyncio.to_thread(self.denoiser.hold_adapters, dirs)
        return _HeldAdapters(self.denoiser, names)

    async def _hold_adapters(self, spec: DenoiseSpec) -> None:
        """The request's adapter set held by this replica (loaded now if it is not)."""
        if not spec.adapters:
            return
        if self._held is None:
            raise AdapterError(spec.adapters[0][0], f"the {self.name} stage serves no adapters")
        await self._held(adapter_set_key([name for name, _ in spec.adapters]))

    async def denoise(
        self, spec: DenoiseSpec, embeddings: Staged, latents: Staged | None = None
    ) -> Staged:
        """The request's latents (C, h, w)."""
        start = time.perf_counter()
        await self._hold_adapters(spec)
        item = _Denoising(spec.request(embeddings, latents))
        inputs = (embeddings,) if latents is None else (embeddings, latents)
        return Staged.after(await self._denoise_one(item), inputs, self.name, start)

    async def denoise_steps(
        self, spec: DenoiseSpec, embeddings: Staged, latents: Staged | None = None
    ) -> AsyncIterator[tuple[int, int, Staged | None]]:
        """``denoise``, streamed: ``(steps done, num_steps, None)`` after each step of the
        request's span, ``(num_steps, num_steps, latents)`` last."""
        start = time.perf_counter()
        await self._hold_adapters(spec)
        steps: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        item = _Denoising(
            spec.request(embeddings, latents),
            on_step=lambda done, total: steps.put_nowait((done, total)),
        )
        result = asyncio.ensure_future(self._denoise_one(item))
        # After the last step's callback: the batch's thread schedules those first.
        result.add_done_callback(lambda _: steps.put_nowait(None))
        inputs = (embeddings,) if latents is None else (embeddings, latents)
        try:
            last = (0, 0)
            while (step := await steps.get()) is not None:
                last = step
                yield (*step, None)
            yield (*last, Staged.after(await result, inputs, self.name, start))
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
            "replica": serve.get_replica_context().replica_id.unique_id,
            "adapters": self.denoiser.adapters,
            "adapter_loads": self.denoiser.adapter_loads,
            **({"encoded": self.num_encoded} if self.encoder is not None else {}),
        }


@serve.deployment
class VaeDecodeStage:
    def __init__(self, model: ModelRef, storage: StorageConfig) -> None:
        self.name = deployment_name()
        self.decoder = VaeDecoder(
            local_bundle(model, storage), device=model.device, dtype=torch_dtype(model)
        )
        self.num_requests = 0

    async def decode(self, output_type: str, *latents: Staged) -> Staged:
        """(H, W, 3) images, uint8 or float32 in [0, 1], of a request's latents (C, h, w)."""
        start = time.perf_counter()
        self.num_requests += 1
        images = await asyncio.to_thread(
            self.decoder.decode, [sample.value for sample in latents], output_type
        )
        return Staged.after(images, latents, self.name, start)

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}


@serve.deployment
class SuperResolutionDeployment:
    """One x4 stage of the cascade; its noise level, steps and guidance come from config."""

    def __init__(self, stage: SuperResolutionStage, storage: StorageConfig) -> None:
        self.name = deployment_name()
        self.stage = stage
        self.upscaler = Upscaler(
            local_bundle(stage.model, storage),
            device=stage.model.device,
            dtype=torch_dtype(stage.model),
        )
        # The pipeline keeps per-call state on itself: one call at a time.
        self.lock = asyncio.Lock()
        self.num_requests = 0

    async def upscale(
        self,
        images: Staged,
        prompt: str,
        negative_prompt: str | None,
        seeds: list[int],
    ) -> Staged:
        start = time.perf_counter()
        self.num_requests += 1
        async with self.lock:
            upscaled = await asyncio.to_thread(
                self.upscaler.upscale,
                images.value,
                [prompt] * len(images.value),
                seeds,
                noise_level=self.stage.noise_level,
                num_inference_steps=self.stage.num_inference_steps,
                guidance_scale=self.stage.guidance_scale,
                negative_prompts=[negative_prompt] * len(images.value),
            )
        return Staged.after(upscaled, (images,), self.name, start)

    async def stats(self) -> dict[str, int]:
        return {"requests": self.num_requests}
