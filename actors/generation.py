"""The serving graph's generation stages: text encoders, denoiser (base or refiner), VAE decode
and x4 super-resolution, each a plain class that loads once from a bundle folder.

Every stage computes exactly what diffusers' monolithic pipeline computes: the text encoders
and the super-resolution stage call the pipeline's own code, the denoiser repeats the family
pipeline's loop (``StableDiffusion3Pipeline.__call__``, ``FluxPipeline.__call__``: same
initial noise per seed, same timesteps, same guidance, the bundle's scheduler doing every
step) and the decoder its tail. Splitting a generation into
stages therefore changes no pixel; ``tests/actors/test_generation.py`` checks it against the
pipelines.

Tensors leave a stage on the CPU, so Ray's object store can hand them to a stage on any
machine. A ``bundle_dir`` is a local folder in diffusers' layout (resolve ``s3://`` first).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import SchedulerMixin, StableDiffusionUpscalePipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from actors.families import family_of
from schemas.errors import AdapterError

ImageType = Literal["uint8", "float32"]


@dataclass(frozen=True)
class PromptEmbeddings:
    """One prompt's conditioning, as the family's ``encode_prompt`` returns it for a batch of
    one. SD3: L = the CLIP positions + ``max_sequence_length`` T5 positions; Flux: L =
    ``max_sequence_length`` T5 positions, pooled from CLIP-L."""

    prompt_embeds: torch.Tensor  # (L, D)
    pooled_prompt_embeds: torch.Tensor | None  # (D_pooled,); None for SD 1.x/2.x
    negative_prompt_embeds: torch.Tensor  # (L, D)
    negative_pooled_prompt_embeds: torch.Tensor | None  # (D_pooled,)

    def to(self, device: torch.device, dtype: torch.dtype) -> PromptEmbeddings:
        values = (getattr(self, field.name) for field in fields(self))
        return PromptEmbeddings(*(v if v is None else v.to(device, dtype) for v in values))


@dataclass(frozen=True)
class DenoiseRequest:
    """One image's denoising: its conditioning, seed and guidance, the shared settings a batch
    is keyed on (adapters included: a batch runs one set of LoRAs at one set of scales), and
    an optional SDXL-style handoff.

    ``denoising_end`` stops at that fraction of the schedule and returns still-noisy latents;
    ``denoising_start`` (with the ``latents`` a previous stage stopped at) continues from that
    fraction. The handoff step is SDXL's: the first step whose timestep is below
    ``(1 - fraction) * num_train_timesteps``, so a base with ``denoising_end=f`` and a refiner
    with ``denoising_start=f`` together run each step of the schedule once. ``seed`` draws the
    initial noise; a request that continues from ``latents`` draws none.
    """

    embeddings: PromptEmbeddings
    seed: int
    guidance_scale: float
    height: int
    width: int
    num_inference_steps: int
    denoising_start: float | None = None
    denoising_end: float | None = None
    latents: torch.Tensor | None = None  # (C, h, w), where a previous stage stopped
    adapters: tuple[tuple[str, float], ...] = ()  # (LoRA name, scale), as set_adapters takes

    def __post_init__(self) -> None:
        for name in ("denoising_start", "denoising_end"):
            fraction = getattr(self, name)
            if fraction is not None and not 0.0 < fraction < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {fraction}")
        if (self.denoising_start is None) != (self.latents is None):
            raise ValueError("denoising_start and latents go together: give both or neither")
        if (
            self.denoising_start is not None
            and self.denoising_end is not None
            and self.denoising_start >= self.denoising_end
        ):
            raise ValueError(
                f"denoising_start {self.denoising_start} must be below "
                f"denoising_end {self.denoising_end}"
            )

    @property
    def batch_key(self) -> tuple[int, int, int, int, tuple[tuple[str, float], ...]]:
        """Requests denoise together only if these agree: (height, width,
        num_inference_steps, sequence length L of the embeddings, adapters)."""
        return (
            self.height,
            self.width,
            self.num_inference_steps,
            self.embeddings.prompt_embeds.shape[0],
            self.adapters,
        )


class PromptEncoder:
    """The bundle's text encoders (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5) through the family's
    ``encode_prompt``, behind an LRU cache of per-text embeddings.

    A text is encoded once per (text, max_sequence_length) while it stays among the
    ``cache_size`` most recently used; ``misses`` counts the texts the encoders ran on,
    ``hits`` every other lookup (a prompt or negative prompt that needed no encoder run). A negative prompt of None is the empty text, as in the
    pipeline. Cached tensors live on the CPU and are returned as they are: treat them as
    read-only.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_size: int = 1024,
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.family = family_of(bundle_dir, media="image")
        self.pipe = self.family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **self.family.unloaded("text_encoders", "tokenizers")
        ).to(device)
        self.zero_negative = self.family.zero_negative(self.pipe)
        self.cache_size = cache_size
        # (text, max_sequence_length) -> ((L, D), (D_pooled,)), least recently used first.
        self._cache: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = (
            OrderedDict()
        )
        self.hits = 0
        self.misses = 0

    def encode(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | None = None,
        max_sequence_length: int = 256,
    ) -> list[PromptEmbeddings]:
        """Embeddings per prompt; all texts not in the cache go through the encoders as one
        batch."""
        if negative_prompts is None:
            negative_prompts = [None] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        # A missing negative prompt is the empty text, or zeros (SDXL's pipeline): None here,
        # encoded by nothing.
        zeros = self.zero_negative
        negatives = [None if n is None and zeros else n or "" for n in negative_prompts]
        texts = [*prompts, *(negative for negative in negatives if negative is not None)]
        keys = [(text, max_sequence_length) for text in texts]
        missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)

        found = {key: self._cache[key] for key in keys if key in self._cache}
        for key in found:
            self._cache.move_to_end(key)
        if missing:
            found.update(self._encode([text for text, _ in missing], max_sequence_length))
            for key in missing:
                self._cache[key] = found[key]
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

        embeddings = []
        for prompt, negative in zip(prompts, negatives, strict=True):
            prompt_embeds, pooled = found[(prompt, max_sequence_length)]
            if negative is None:
                negative_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled = None if pooled is None else torch.zeros_like(pooled)
            else:
                negative_embeds, negative_pooled = found[(negative, max_sequence_length)]
            embeddings.append(
                PromptEmbeddings(prompt_embeds, pooled, negative_embeds, negative_pooled)
            )
        return embeddings

    def _encode(
        self, texts: list[str], max_sequence_length: int
    ) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]]:
        # A negative prompt goes through the same code as a prompt (encode_prompt encodes
        # both with clip_skip None), so one call without guidance encodes either kind.
        prompt_embeds, pooled = self.family.encode_prompt(
            self.pipe, texts, max_sequence_length
        )  # (B, L, D), (B, D_pooled) or None (SD 1.x/2.x pools nothing)
        # A copy per text: a view would keep (and pickle) the whole batch's storage.
        return {
            (text, max_sequence_length): (
                prompt_embeds[index].to("cpu", copy=True),
                None if pooled is None else pooled[index].to("cpu", copy=True),
            )
            for index, text in enumerate(texts)
        }


class Denoiser:
    """The bundle's transformer (SD3's MMDiT, Flux's) and flow-matching scheduler: the base
    model or an SDXL-style refiner.

    ``denoise`` runs a batch of requests that share ``DenoiseRequest.batch_key``; each step is
    one transformer forward over [uncond of the guided requests..., cond of all...] (the
    family's ``predict``), and the scheduler owns the step math. Guidance is the family's: a
    classifier-free pass for SD3, the scale as an input for Flux dev, none for Flux schnell. A call builds its own schedulers, so nothing carries over
    from one call to the next. A callback after each step sees every request's progress and
    can stop the call there, as diffusers' ``callback_on_step_end`` and ``interrupt`` do.

    LoRAs: ``hold_adapters`` loads them into the transformer as the family pipeline's
    ``load_lora_weights`` does, ``release_adapters`` lets them go once nothing holds them; a
    call runs its requests' adapters at their scales (``set_adapters``) and the base alone
    for requests without. A call whose adapters were let go meanwhile loads them back for
    itself. Loads, deletes and calls take turns (a lock), so a forward never sees an adapter
    half loaded.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = family = family_of(bundle_dir, media="image")
        pipe = family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **family.unloaded("denoisers")
        )
        # The family's denoiser: a transformer (SD3, Flux) or SDXL's UNet.
        self.transformer = getattr(pipe, family.denoisers[0]).to(self.device).eval()
        self.guidance = family.guidance(self.transformer.config)
        self.aesthetic_scores = family.aesthetic_scores(pipe)  # SDXL's refiner: (6.0, 2.5)
        # A template only: each call steps fresh copies of it.
        self.scheduler = pipe.scheduler
        self.multiples = family.multiples(bundle_dir)
        self.pipeline_class = family.pipeline  # its LoRA loader reads diffusers' format
        self._holds: Counter[str] = Counter()  # adapter name -> holders
        self._adapter_dirs: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.adapter_loads = 0

    @property
    def adapters(self) -> list[str]:
        """The LoRAs in the transformer now."""
        return sorted(getattr(self.transformer, "peft_config", {}))

    def hold_adapters(self, dirs: dict[str, str | Path]) -> None:
        """Load the LoRAs (name -> diffusers-format folder) not loaded yet, and hold each
        once more. Raises ``AdapterError`` naming one that this transformer cannot take, and
        then holds none of them."""
        with self._lock:
            try:
                for name, folder in dirs.items():
                    self._adapter_dirs[name] = Path(folder)
                    if name not in self.adapters:
                        self._load_adapter(name)
            except Exception:
                self._drop_unheld()
                raise
            self._holds.update(list(dirs))

    def release_adapters(self, names: Sequence[str]) -> None:
        """Hold each once less; delete those nothing holds."""
        with self._lock:
            self._holds.subtract(names)
            self._drop_unheld()

    def _load_adapter(self, name: str) -> None:
        folder = self._adapter_dirs[name]
        state_dict, metadata = self.pipeline_class.lora_state_dict(
            folder, return_lora_metadata=True
        )
        others = sorted({key.split(".")[0] for key in state_dict} - {"transformer"})
        if others:
            raise AdapterError(
                name, f"holds {', '.join(others)} weights; served adapters adapt the transformer"
            )
        try:
            self.pipeline_class.load_lora_into_transformer(
                state_dict, transformer=self.transformer, adapter_name=name, metadata=metadata
            )
        except (RuntimeError, ValueError, KeyError) as err:
            if name in self.adapters:
                self.transformer.delete_adapters(name)
            # torch's size-mismatch message is a line per tensor: the first says enough.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            mismatch = [line for line in lines if line.startswith("size mismatch")]
            detail = (mismatch or lines or [type(err).__name__])[0]
            raise AdapterError(name, f"does not fit this base's transformer ({detail})") from None
        self.adapter_loads += 1

    def _drop_unheld(self) -> None:
        unheld = [name for name in self.adapters if self._holds[name] <= 0]
        if unheld:
            self.transformer.delete_adapters(unheld)
        self._holds = +self._holds  # drop the zero counts

    def _use_adapters(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """The transformer as this call's requests want it (under the lock)."""
        for name, _ in adapters:
            if name not in self.adapters:
                if name not in self._adapter_dirs:
                    raise AdapterError(name, "not held by this replica")
                self._load_adapter(name)  # let go while its request waited for this call
        if not self.adapters:
            return  # no LoRA layers: the plain transformer
        if not adapters:
            self.transformer.disable_lora()
            return
        self.transformer.enable_lora()
        self.transformer.set_adapters(
            [name for name, _ in adapters], [scale for _, scale in adapters]
        )

    def denoise(
        self,
        requests: Sequence[DenoiseRequest],
        callback_on_step_end: Callable[[list[int], list[int]], bool] | None = None,
    ) -> list[torch.Tensor]:
        """Latents (C, h, w) per request, in the pipeline's latent space (before the VAE's
        scaling), on the CPU.

        ``callback_on_step_end(steps_done, num_steps)`` runs after each step of the call with,
        per request, the steps of its span of the schedule run so far and the steps in that
        span. When it returns True the call stops there and every request's latents come back
        as they are, as diffusers' pipelines return them when ``interrupt`` is set.
        """
        if not requests:
            raise ValueError("denoise needs at least one request")
        height, width, num_inference_steps, _, adapters = key = requests[0].batch_key
        for request in requests:
            if request.batch_key != key:
                raise ValueError(
                    "requests in one denoise call must share (height, width, "
                    f"num_inference_steps, sequence length, adapters): {request.batch_key} != "
                    f"{key}"
                )
        with self._lock:
            try:
                self._use_adapters(adapters)
                return self._denoise(requests, callback_on_step_end)
            finally:
                self._drop_unheld()  # any this call loaded back for itself

    def _denoise(
        self,
        requests: Sequence[DenoiseRequest],
        callback_on_step_end: Callable[[list[int], list[int]], bool] | None,
    ) -> list[torch.Tensor]:
        height, width, num_inference_steps, _, _ = requests[0].batch_key
        self.multiples.check_size(height, width)
        latent_shape = (
            1,
            self.family.latent_channels(self.transformer.config),
            height // self.multiples.latent,
            width // self.multiples.latent,
        )
        reference = self._scheduler(num_inference_steps, latent_shape)
        timesteps = reference.timesteps  # (N,)

        # Each request runs the steps [begin, end) of the shared schedule; one scheduler per
        # distinct range, started at its first step as SDXL's img2img does at a handoff.
        spans = [
            (
                self._handoff(request.denoising_start, timesteps, 0),
                self._handoff(request.denoising_end, timesteps, len(timesteps)),
            )
            for request in requests
        ]
        schedulers = {}
        for begin, end in dict.fromkeys(spans):
            schedulers[begin, end] = self._scheduler(num_inference_steps, latent_shape)
            if hasattr(schedulers[begin, end], "set_begin_index"):  # as diffusers' img2img
                schedulers[begin, end].set_begin_index(begin)  # (PNDM steps by timestep)
        latents = [self._initial_latents(r, latent_shape, reference) for r in requests]
        embeddings = [request.embeddings.to(self.device, self.dtype) for request in requests]

        num_steps = [end - begin for begin, end in spans]
        first_step = min(begin for begin, _ in spans)
        last_step = max(end for _, end in spans)
        with torch.no_grad():
            for step in range(first_step, last_step):
                t = timesteps[step]
                active = [i for i, (begin, end) in enumerate(spans) if begin <= step < end]
                # What the transformer reads at t: the scheduler's scaling of each sample.
                inputs = {i: _scaled(schedulers[spans[i]], latents[i], t) for i in active}
                predictions = self._predict(t, active, requests, embeddings, inputs)
                for span, scheduler in schedulers.items():
                    members = [i for i in active if spans[i] == span]
                    if not members:
                        continue
                    stepped = scheduler.step(
                        torch.stack([predictions[i] for i in members]),
                        t,
                        torch.stack([latents[i] for i in members]),
                        return_dict=False,
                    )[0]  # (M, C, h, w)
                    for i, sample in zip(members, stepped, strict=True):
                        latents[i] = sample
                if callback_on_step_end is not None:
                    steps_done = [
                        min(max(step + 1 - begin, 0), end - begin) for begin, end in spans
                    ]
                    if callback_on_step_end(steps_done, num_steps):
                        break
        # A copy each: a view would keep (and pickle) the whole batch's storage.
        return [sample.to("cpu", copy=True) for sample in latents]

    def _predict(
        self,
        t: torch.Tensor,
        active: list[int],
        requests: Sequence[DenoiseRequest],
        embeddings: list[PromptEmbeddings],
        latents: dict[int, torch.Tensor],
    ) -> dict[int, torch.Tensor]:
        """The guided prediction (C, h, w) of each active request at timestep ``t``, from one
        transformer forward over [uncond of the guided requests..., cond of all active...]."""
        # The pipeline runs no unconditional pass at guidance_scale <= 1, nor for a family
        # whose guidance is not classifier-free.
        guided = [i for i in active if self.guidance == "cfg" and requests[i].guidance_scale > 1]
        rows = guided + active
        guidance = None
        if self.guidance == "embedded":
            # FluxPipeline's float32 guidance tensor, a scale per row.
            guidance = torch.tensor(
                [requests[i].guidance_scale for i in rows], dtype=torch.float32, device=self.device
            )  # (G + A,)
        pooled = [embeddings[i].negative_pooled_prompt_embeds for i in guided] + [
            embeddings[i].pooled_prompt_embeds for i in active
        ]
        time_ids = None
        if self.family.size_conditioning:
            # The pipeline's default: made at (height, width), uncropped, in both branches; a
            # refiner's end with the positive or the negative aesthetic score.
            scores = self.aesthetic_scores or (None, None)
            ids = [
                self.family.time_ids(
                    (r.height, r.width), (0, 0), (r.height, r.width), scores[row < len(guided)]
                )
                for row, r in enumerate(requests[i] for i in rows)
            ]
            dtype = embeddings[rows[0]].prompt_embeds.dtype
            time_ids = torch.tensor(ids, dtype=dtype, device=self.device)  # (G + A, 6 or 5)
        noise_pred = self.family.predict(
            self.transformer,
            torch.stack([latents[i] for i in rows]),  # (G + A, C, h, w)
            t.expand(len(rows)),
            torch.stack(
                [embeddings[i].negative_prompt_embeds for i in guided]
                + [embeddings[i].prompt_embeds for i in active]
            ),  # (G + A, L, D)
            None if pooled[0] is None else torch.stack(pooled),  # (G + A, D_pooled)
            guidance,
            time_ids,
        )  # (G + A, C, h, w)
        uncond = dict(zip(guided, noise_pred[: len(guided)], strict=True))
        cond = dict(zip(active, noise_pred[len(guided) :], strict=True))
        for i in guided:
            # The pipeline's guidance, with this request's scale.
            cond[i] = uncond[i] + requests[i].guidance_scale * (cond[i] - uncond[i])
        return cond

    def _scheduler(self, num_inference_steps: int, latent_shape: tuple[int, ...]) -> SchedulerMixin:
        """A fresh scheduler with the pipeline's timesteps (the step index lives in it)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        kwargs = self.family.timestep_kwargs(
            scheduler.config, self.transformer.config, num_inference_steps, latent_shape[2:]
        )
        retrieve_timesteps(scheduler, num_inference_steps, self.device, **kwargs)
        return scheduler

    def _handoff(self, fraction: float | None, timesteps: torch.Tensor, default: int) -> int:
        """SDXL's handoff step: how many timesteps are at or above the cutoff."""
        if fraction is None:
            return default
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        cutoff = int(round(num_train_timesteps - fraction * num_train_timesteps))
        return int((timesteps >= cutoff).sum())

    def _initial_latents(
        self, request: DenoiseRequest, latent_shape: tuple[int, ...], scheduler: Any
    ) -> torch.Tensor:
        if request.latents is not None:
            if request.latents.shape != latent_shape[1:]:
                raise ValueError(
                    f"latents of shape {tuple(request.latents.shape)} do not fit "
                    f"{request.width}x{request.height}: expected {latent_shape[1:]}"
                )
            return request.latents.to(self.device, self.dtype)  # (C, h, w)
        # What the pipeline draws for one prompt given a seeded CPU generator (Flux draws
        # (1, C, h, w) too, and packs it after).
        generator = torch.Generator("cpu").manual_seed(request.seed)
        noise = randn_tensor(
            latent_shape, generator=generator, device=self.device, dtype=self.dtype
        )
        if hasattr(scheduler, "init_noise_sigma"):
            # SDXL's Euler starts at its largest sigma (a flow-matching scheduler has none).
            noise = noise * scheduler.init_noise_sigma
        return noise[0]  # (C, h, w)


class VaeDecoder:
    """The bundle's VAE: latents to images, as the family's pipeline's tail does."""

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.family = family_of(bundle_dir, media="image")
        self.pipe = self.family.pipeline.from_pretrained(
            bundle_dir, dtype=dtype, **self.family.unloaded("vae")
        ).to(device)

    def decode(
        self, latents: Sequence[torch.Tensor], output_type: ImageType = "uint8"
    ) -> list[np.ndarray]:
        """(H, W, 3) images from (C, h, w) latents of one shape: uint8, or float32 in [0, 1]
        (the pipeline's ``output_type="np"``)."""
        shapes = {tuple(sample.shape) for sample in latents}
        if len(shapes) != 1:
            raise ValueError(f"latents in one decode call must share a shape, got {shapes}")
        vae = self.pipe.vae
        batch = torch.stack(list(latents)).to(vae.device, vae.dtype)  # (B, C, h, w)
        batch = self.family.denormalize(batch, vae.config)
        with torch.no_grad():
            pixels = vae.decode(batch, return_dict=False)[0]  # (B, 3, H, W)
        images = self.pipe.image_processor.postprocess(pixels, output_type="np")
        return list(_as_type(images, output_type))


class Upscaler:
    """An x4 super-resolution stage (StableDiffusionUpscalePipeline bundle), called as is.

    Its ``noise_level`` is Imagen's conditioning augmentation: the low-res image is noised to
    that level (by the bundle's ``low_res_scheduler``) and the UNet is told the level.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.pipe = StableDiffusionUpscalePipeline.from_pretrained(bundle_dir, dtype=dtype).to(
            device
        )
        self.pipe.set_progress_bar_config(disable=True)

    def upscale(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        noise_level: int,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompts: Sequence[str | None] | None = None,
        output_type: ImageType = "uint8",
    ) -> list[np.ndarray]:
        """(4H, 4W, 3) images from uint8 (H, W, 3) ones of one size, one prompt and seed each.

        Each image gets the noise a pipeline call for it alone with a CPU generator seeded
        with its seed would draw.
        """
        if not len(images) == len(prompts) == len(seeds):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(seeds)} seeds")
        shapes = {image.shape for image in images}
        if len(shapes) != 1:
            raise ValueError(f"images in one upscale call must share a size, got {shapes}")
        if negative_prompts is not None:
            # The pipeline's own stand-in for a missing negative prompt.
            negative_prompts = [negative or "" for negative in negative_prompts]
        # uint8 -> [0, 1], as the pipeline's processor reads a PIL image.
        pixels = np.stack(images).astype(np.float32) / 255  # (B, H, W, 3)
        upscaled = self.pipe(
            prompt=list(prompts),
            image=pixels,
            negative_prompt=negative_prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            noise_level=noise_level,
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="np",
        ).images  # (B, 4H, 4W, 3) in [0, 1]
        return list(_as_type(upscaled, output_type))


def _scaled(scheduler: Any, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's ``scale_model_input`` where it has one (SDXL's Euler divides by
    sqrt(sigma^2 + 1)); flow-matching schedulers feed the latents as they are."""
    if hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(sample, t)
    return sample


def _as_type(images: np.ndarray, output_type: ImageType) -> np.ndarray:
    if output_type == "float32":
        return images
    # Quantized as VaeImageProcessor.numpy_to_pil does.
    return (images * 255).round().astype(np.uint8)
