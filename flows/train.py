"""`raygen train`: a diffusion transformer trained on prep shards with Ray Train.

One loop (``train_loop``) serves training and distillation: the objective differs
(``RectifiedFlow`` in flows/objectives.py, ``LatentConsistencyDistillation`` in
flows/distill.py), the machinery is shared: the shards per worker (``flows/shard_reader.py``:
one aspect-ratio bucket per batch, small buckets held in memory, large ones streamed by Ray
Data), DDP or FSDP, AdamW + warmup/cosine, clipping, EMA, gradient accumulation,
sharded checkpoints (``torch.distributed.checkpoint``, every rank writing its own shards)
through ``ray.train.report`` (resumable on any number of workers, restarted by
``FailureConfig``), metrics, sample grids, and a diffusers bundle at the end.

The driver plans first (``plan_run``): every config mistake it can see (bucket shapes the
model cannot patch, latent channels that do not match, missing shards, a batch smaller than
the worker count) fails before any worker starts, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from diffusers.training_utils import EMAModel
from PIL import Image
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from safetensors.numpy import load as load_safetensors_numpy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from actors.families import FAMILIES, Family, component_config, family_of
from actors.shape_detector import detect_image
from cluster.bundles import resolve_bundle
from cluster.ray_runtime import DriverConsole, init_ray
from cluster.storage import Storage, is_s3, join
from flows.objectives import Objective, shard_blocks, training_objective, unwrapped_copy, where_rows
from flows.shard_reader import (
    Bucket,
    BucketStream,
    bucket_datasets,
    embeddings_and_latents,
    read_buckets,
    read_worker_rows,
)
from flows.tracking import check_installed
from flows.train_log import MetricsLog, png_bytes
from schemas.config import (
    ConfigError,
    LoopConfig,
    ModelRef,
    PrepConfig,
    TrainConfig,
)
from schemas.errors import RaygenError
from schemas.shapes import HELD_OUT, ShapeCaption
from schemas.shards import IMAGE_EMBEDS, MANIFEST_NAME, BucketKey, Manifest

# Ray Train keeps its run state (checkpoints, snapshot) under <output>/<RUN_NAME>.
RUN_NAME = "ray-train"
STOPPED = "stopped.json"  # why a run stopped early: written by rank 0, read by the driver


class TrainingError(RaygenError):
    """A run that cannot go on: a non-finite loss, a run folder in the way."""


# ----------------------------------------------------------------------------------------
# The plan: what the driver checks and hands to every worker.
# ----------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Everything a worker needs besides the config; small, so it travels by value."""

    media: str  # "image" | "video"
    bundle_dir: str  # local folder of the bundle; workers on other nodes re-resolve s3:// ones
    bundle_uri: str
    transformer_class: str
    pipeline_class: str  # the bundle's model_index.json _class_name: its family's key
    buckets: dict[str, Bucket]
    batch_per_worker: int
    vae: dict[str, Any]  # the manifest's factors for this media kind
    empty_prompt: dict[str, np.ndarray]  # "prompt_embeds" (L, D), "pooled_prompt_embeds" (D,)
    latent_downscale: int = 8  # pixels per latent position along a side (the VAE's)
    samples: dict[str, np.ndarray] = field(default_factory=dict)  # fixed rows for sample grids
    sample_bucket: str = ""
    # eval_every: the shapes held-out prompts and their embeddings, "prompt_embeds" (P, L, D)
    # and "pooled_prompt_embeds" (P, D), encoded as prep encoded the captions.
    eval_prompts: list[str] = field(default_factory=list)
    eval_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    # DreamBooth's prior preservation: the class images' plan (held in memory) and its weight.
    prior: RunPlan | None = None
    prior_loss_weight: float = 1.0

    @property
    def family(self) -> Family:
        return FAMILIES[self.pipeline_class]

    # The data side of the loop. A plan says what its rows are and how they reach a worker;
    # flows/autoencoder.py's PixelPlan is the other kind (decoded pixels of a corpus).

    def describe(self) -> str:
        described = f"{self.media} {self.transformer_class}, buckets " + ", ".join(
            f"{b.name} ({b.num_rows} rows)" for b in self.buckets.values()
        )
        if self.prior is not None:
            rows = sum(b.num_rows for b in self.prior.buckets.values())
            described += f"; prior: {rows} class rows, loss weight {self.prior_loss_weight:g}"
        return described

    @property
    def streams_data(self) -> bool:
        """Whether Ray Data reads rows while the workers train (held buckets need no reads)."""
        return not all(bucket.in_memory for bucket in self.buckets.values())

    def datasets(self, storage: Storage) -> dict[str, ray.data.Dataset]:
        return bucket_datasets(self.buckets, storage)

    def open_stream(self, config: LoopConfig, rank: int, num_workers: int) -> BucketStream:
        """This worker's batches (called in a Ray Train worker): small buckets read here,
        once, before the first step's clock starts; large ones streamed."""
        storage = Storage(config.storage)
        held = {
            name: read_worker_rows(bucket, storage, rank, num_workers)
            for name, bucket in self.buckets.items()
            if bucket.in_memory
        }
        streams = {
            name: ray.train.get_dataset_shard(name)
            for name, bucket in self.buckets.items()
            if not bucket.in_memory
        }
        return BucketStream(
            self.buckets, streams, held, self.batch_per_worker, config.seed,
            config.shuffle_buffer, rank=rank,
        )  # fmt: skip

    def model_inputs(
        self,
        arrays: dict[str, np.ndarray],
        config: LoopConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        return _to_model_inputs(arrays, self, config.caption, generator, device)

    def sample_grid(
        self,
        objective: Objective,
        weights: dict[str, torch.Tensor],
        config: LoopConfig,
        device: torch.device,
    ) -> bytes:
        return sample_grid(objective, self, weights, config, device)

    def prompt_following(
        self,
        objective: Objective,
        weights: dict[str, torch.Tensor],
        config: LoopConfig,
        device: torch.device,
    ) -> dict[str, float]:
        return prompt_following(objective, self, weights, config, device)


class DataPlan(Protocol):
    """What the loop asks of a plan (RunPlan: prep shards; flows/autoencoder.py: pixels)."""

    media: str
    bundle_uri: str
    bundle_dir: str
    batch_per_worker: int
    prior: Any  # a second plan whose batches train beside this one's, or None
    prior_loss_weight: float

    def describe(self) -> str: ...

    @property
    def streams_data(self) -> bool: ...

    def datasets(self, storage: Storage) -> dict[str, ray.data.Dataset]: ...

    def open_stream(self, config: LoopConfig, rank: int, num_workers: int) -> Iterator[Any]: ...

    def model_inputs(
        self,
        arrays: dict[str, np.ndarray],
        config: LoopConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, torch.Tensor]: ...

    def sample_grid(
        self, objective: Any, weights: dict[str, torch.Tensor], config: LoopConfig, device: Any
    ) -> bytes: ...

    def prompt_following(
        self, objective: Any, weights: dict[str, torch.Tensor], config: LoopConfig, device: Any
    ) -> dict[str, float]: ...


def plan_run(config: LoopConfig, bundle_uri: str, storage: Storage) -> RunPlan:
    manifest_uri = join(config.data, MANIFEST_NAME)
    if not storage.exists(manifest_uri):
        raise ConfigError(f"data: no {manifest_uri}: run `raygen prep` into {config.data} first")
    manifest = Manifest.model_validate_json(storage.read_bytes(manifest_uri))
    bundle_dir = resolve_bundle(bundle_uri, storage)
    index = json.loads((bundle_dir / "model_index.json").read_text())
    family = family_of(bundle_uri, storage)  # an error names the URI the user gave
    media = family.media
    transformer_class = index[family.denoisers[0]][1]
    transformer_config = component_config(bundle_dir, family.denoisers[0])
    if isinstance(config, TrainConfig) and config.init == "scratch":
        transformer_config.update(config.transformer_config)
    elif isinstance(config, TrainConfig) and config.transformer_config:
        raise ConfigError("transformer_config: only used with init: scratch")

    buckets = read_buckets(config.data, manifest, media, storage)
    if not buckets:
        raise ConfigError(
            f"data: {config.data} has no {media} shards (buckets: {sorted(manifest.buckets)}); "
            f"a {transformer_class} trains on {media} latents"
        )
    if family.conditions_on_image:
        # Its transformer also reads each clip's first frame (encoded, with a mask) and that
        # frame's image tokens, which prep stores with an image-to-video video_bundle.
        first = next(iter(buckets.values())).files[0]
        fs, path = storage.filesystem(first)
        if IMAGE_EMBEDS not in pq.read_schema(path, filesystem=fs).names:
            raise ConfigError(
                f"data: {config.data} holds no first-frame conditioning ({IMAGE_EMBEDS}), which "
                f"a {family.class_name} trains on: prep with this bundle as video_bundle"
            )
    _check_shapes(buckets, transformer_config, transformer_class, family)

    world = config.num_workers * config.gradient_accumulation_steps
    if config.batch_size < config.num_workers or config.batch_size % world:
        raise ConfigError(
            f"batch_size: {config.batch_size} must be a multiple of num_workers x "
            f"gradient_accumulation_steps = {config.num_workers} x "
            f"{config.gradient_accumulation_steps}"
        )
    batch_per_worker = config.batch_size // world
    for bucket in buckets.values():
        # Each worker gets num_rows // num_workers rows (held, or a streaming split with
        # equal=True); every worker then draws the same number of full batches from each bucket.
        bucket.batches_per_epoch = bucket.num_rows // config.num_workers // batch_per_worker
        bucket.in_memory = bucket.num_bytes <= config.in_memory_bucket_bytes
    usable = {name: b for name, b in buckets.items() if b.batches_per_epoch}
    if not usable:
        rows = {name: b.num_rows for name, b in buckets.items()}
        raise ConfigError(
            f"batch_size: {config.batch_size} over {config.num_workers} workers needs "
            f"{batch_per_worker * config.num_workers} rows in a bucket; buckets have {rows}"
        )
    if manifest.empty_prompt is None:
        raise ConfigError(f"data: {manifest_uri} names no empty-prompt embeddings")
    empty = load_safetensors_numpy(storage.read_bytes(join(config.data, manifest.empty_prompt)))
    plan = RunPlan(
        media=media,
        bundle_dir=str(bundle_dir.resolve()),
        bundle_uri=bundle_uri,
        transformer_class=transformer_class,
        pipeline_class=index["_class_name"],
        buckets=usable,
        batch_per_worker=batch_per_worker,
        vae=manifest.vae[media],
        latent_downscale=family.multiples(bundle_dir).latent,
        empty_prompt={
            k.removeprefix(f"{media}_"): v for k, v in empty.items() if k.startswith(media)
        },
    )
    _check_text_widths(plan, transformer_config, transformer_class)
    plan.sample_bucket, plan.samples = _sample_rows(plan, config.num_samples, storage)
    if config.eval_every:
        if media != "image":
            raise ConfigError(f"eval_every: scores images; a {transformer_class} makes videos")
        plan.eval_prompts = [caption.text for caption in HELD_OUT]
        prep = PrepConfig.model_validate(manifest.config)
        prep = prep.model_copy(update={"bundle": ModelRef(uri=bundle_uri), "video_bundle": None})
        init_ray(config.ray)
        embeddings = ray.get(_prompt_embeddings.remote(prep, plan.eval_prompts))
        plan.eval_embeddings = {k.removeprefix("image_"): v for k, v in embeddings.items()}
    return plan


@ray.remote
def _prompt_embeddings(config: PrepConfig, prompts: list[str]) -> dict[str, np.ndarray]:
    """On a worker (it loads the text encoders, never on the driver)."""
    from actors.encoders import prompt_embeddings

    return prompt_embeddings(config, prompts)


def _check_shapes(
    buckets: dict[str, Bucket], model: dict[str, Any], transformer_class: str, family: Family
) -> None:
    channels = family.latent_channels(model)
    patch = family.latent_patch(model)  # (t?, h, w)
    for bucket in buckets.values():
        shape = bucket.latent_shape
        if shape[0] != channels:
            raise ConfigError(
                f"bundle: {transformer_class} takes {channels} latent channels but data bucket "
                f"{bucket.name} holds {shape[0]}: the shards were encoded with another VAE"
            )
        if any(size % p for size, p in zip(shape[-len(patch) :], patch, strict=True)):
            raise ConfigError(
                f"data: bucket {bucket.name} has latents {'x'.join(map(str, shape[1:]))} that "
                f"{transformer_class}'s patch {'x'.join(map(str, patch))} does not divide; "
                f"re-run prep with buckets.step a multiple of patch x VAE factor"
            )
        max_size = model.get("pos_embed_max_size")
        if max_size and max(shape[-2:]) > max_size * patch[-1]:
            raise ConfigError(
                f"data: bucket {bucket.name} has latents {shape[-2]}x{shape[-1]}, above "
                f"{transformer_class}'s pos_embed_max_size {max_size} x patch {patch[-1]}"
            )


def _check_text_widths(plan: RunPlan, model: dict[str, Any], transformer_class: str) -> None:
    width, _ = plan.family.text_widths(model)
    stored = plan.empty_prompt["prompt_embeds"].shape[-1]
    if width != stored:
        raise ConfigError(
            f"bundle: {transformer_class} reads text embeddings of width {width} but the data "
            f"holds width {stored}: the shards were encoded with other text encoders"
        )


def _sample_rows(
    plan: RunPlan, num_samples: int, storage: Storage
) -> tuple[str, dict[str, np.ndarray]]:
    """The first rows of the largest bucket: their stored embeddings stand in for fixed prompts,
    so sample grids need no text encoder on the workers."""
    bucket = max(plan.buckets.values(), key=lambda b: b.num_rows)
    fs, path = storage.filesystem(bucket.files[0])
    table = pq.read_table(path, filesystem=fs).slice(0, num_samples)
    return bucket.name, {k: v for k, v in embeddings_and_latents(table).items() if k != "latents"}


# ----------------------------------------------------------------------------------------
# The loop every worker runs.
# ----------------------------------------------------------------------------------------


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _wrap(model: torch.nn.Module, parallelism: str, device: torch.device) -> torch.nn.Module:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if parallelism == "fsdp":
        return shard_blocks(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _no_grad_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps."""
    if sync:
        return nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_sync_off(model)
    return nullcontext()


@contextmanager
def _fsdp_sync_off(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@dataclass(frozen=True)
class StepStatus:
    loss: float  # mean over ranks
    grad_norm: float
    loss_finite: bool  # on every rank
    grad_finite: bool
    report_due: bool  # on any rank's clock


def _step_status(loss: torch.Tensor, grad_norm: torch.Tensor, report_due: bool) -> StepStatus:
    """What every rank must agree on after a step, in one all-reduce and one host sync: a
    non-finite value anywhere stops all ranks together (instead of some hanging in the next
    collective), and all send metrics on the same step (``ray.train.report`` is a collective)."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss, grad_norm = loss.detach().float(), grad_norm.detach().float().to(loss.device)
    # (5,): loss, grad norm, non-finite loss, non-finite grad norm, report due; summed over ranks
    values = torch.stack(
        [
            loss,
            grad_norm,
            (~torch.isfinite(loss)).float(),
            (~torch.isfinite(grad_norm)).float(),
            torch.tensor(float(report_due), device=loss.device),
        ]
    )
    world = 1
    if dist.is_initialized():
        dist.all_reduce(values)
        world = dist.get_world_size()
    total_loss, total_norm, bad_loss, bad_norm, due = values.tolist()
    return StepStatus(total_loss / world, total_norm / world, bad_loss == 0, bad_norm == 0, due > 0)


def _mean_over_ranks(values: list[torch.Tensor]) -> float:
    """The mean of this step's values on every rank (a collective: every rank calls it)."""
    mean = torch.stack(values).mean().detach().float()
    if dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return float(mean)


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Exports: without the frozen parameters (a LoRA's base comes from the bundle), so a LoRA run
# does not gather the base it does not save; buffers stay in.
TRAINED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Checkpoints: each rank's own shards, gathered nowhere (DTensors under FSDP, whole tensors
# under DDP or on one worker), which torch.distributed.checkpoint writes per rank and
# reshards on load for any number of workers; the frozen parameters left out as above.
SHARDED = StateDictOptions(ignore_frozen_params=True)


def _full_weights(
    model: torch.nn.Module, options: StateDictOptions = FULL
) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (every rank must call: FSDP gathers)."""
    return get_model_state_dict(model, options=options)


def _ema_weights(
    model: torch.nn.Module,
    ema: EMAModel,
    params: list[torch.nn.Parameter],
    options: StateDictOptions = FULL,
) -> dict[str, torch.Tensor]:
    """Weights with the EMA in place of ``params``, the trained parameters (a LoRA's: the
    frozen base is not averaged)."""
    ema.store(params)
    ema.copy_to(params)
    weights = _full_weights(model, options)
    ema.restore(params)
    return weights


def _trained(weights: dict[str, torch.Tensor], names: set[str] | None) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: the trained parameters ``names`` (None: everything). A LoRA's
    checkpoint is its matrices, not the base's buffers either (SD3's pos_embed is large)."""
    return weights if names is None else {k: v for k, v in weights.items() if k in names}


def train_loop(args: dict[str, Any]) -> None:
    """What each Ray Train worker runs; ``args`` = config JSON, the driver's console, and a
    reference to the plan and the objective's class."""
    config: LoopConfig = args["config_cls"].model_validate(args["config"])
    run = ray.get(args["run"])
    plan: DataPlan = run["plan"]
    if is_s3(plan.bundle_uri):
        # The driver's download cache may be on another node: fetch (once per node) here.
        bundle_dir = resolve_bundle(plan.bundle_uri, Storage(config.storage))
        plan = dataclasses.replace(plan, bundle_dir=str(bundle_dir))
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.set_num_threads(math.ceil(config.cpus_per_worker))
    # Same init on every rank (DDP also broadcasts), different noise per rank and step below.
    torch.manual_seed(config.seed)

    # --- model, EMA, optimizer, schedule ---
    objective: Objective = run["objective"](config, plan, device)
    raw_model = objective.model
    if config.gradient_checkpointing:
        raw_model.enable_gradient_checkpointing()
    model = _wrap(raw_model, config.parallelism, device)
    # The trained parameters by name (DDP's are the model's own): a checkpoint keeps the
    # EMA's copy of each under its name.
    named = {n: p for n, p in raw_model.named_parameters() if p.requires_grad}
    params = list(named.values())
    # A LoRA run trains (and checkpoints) its matrices only; None: every parameter trains.
    frozen = any(not p.requires_grad for p in raw_model.parameters())
    trained = set(named) if frozen else None
    loading = StateDictOptions(strict=trained is None)
    optim = config.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, optim.warmup_steps, config.max_steps, optim.min_lr_ratio),
    )
    # FSDP's DTensor parameters have no sharding rule for the fused _foreach_copy_.
    foreach = config.parallelism != "fsdp"
    ema = EMAModel(params, decay=config.ema_decay, foreach=foreach)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    )

    world = ray.train.get_context().get_world_size()
    stream = plan.open_stream(config, rank, world)
    # Prior preservation: a class batch beside each instance batch, as one more accumulation
    # micro-step (its gradient summed before the one all-reduce), weighted by its loss weight.
    prior_stream = plan.prior.open_stream(config, rank, world) if plan.prior else None
    step = 0
    # Metric records not yet sent to the driver, and when the last report went.
    records: list[dict[str, Any]] = []
    last_report = time.monotonic()

    def checkpoint_state() -> dict[str, Any]:
        """What a checkpoint holds, as torch.distributed.checkpoint writes it and, on resume,
        loads into it in place: this rank's shards of the trained weights, of their EMA and of
        the optimizer state; the schedule, the objective's own state, the step and the data
        position (the same on every rank, written once)."""
        loop = {
            "step": step,
            "ema_step": ema.optimization_step,
            "epoch": stream.epoch,
            "position": stream.position,
            # What the position counts in: batches of batch_size // accumulation rows, the
            # same number per epoch on any number of workers.
            "batch_size": config.batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
        }
        if prior_stream is not None:
            loop |= {"prior_epoch": prior_stream.epoch, "prior_position": prior_stream.position}
        return {
            "model": _trained(get_model_state_dict(model, options=SHARDED), trained),
            "ema": dict(zip(named, ema.shadow_params, strict=True)),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=SHARDED),
            "schedule": schedule.state_dict(),
            "objective": objective.state_dict(),
            "loop": loop,
        }

    # --- resume: from the latest checkpoint (`--resume`, or a worker-group restart) ---
    checkpoint = ray.train.get_checkpoint()
    resumed_from: int | None = None  # the checkpoint's step, on the next record only
    if checkpoint:
        # Into this rank's own tensors: a checkpoint of another number of workers is
        # resharded on the way in (the EMA's copies and the weights alike).
        state = checkpoint_state()
        with checkpoint.as_directory() as folder:
            dcp.load(state, checkpoint_id=folder)
        loop = state["loop"]
        saved = (loop["batch_size"], loop["gradient_accumulation_steps"])
        if saved != (config.batch_size, config.gradient_accumulation_steps):
            _stop(
                config, rank, loop["step"],
                f"batch_size {config.batch_size} with gradient_accumulation_steps "
                f"{config.gradient_accumulation_steps}: the checkpoint's data position (epoch "
                f"{loop['epoch']}, batch {loop['position']}) counts batches of batch_size "
                f"{saved[0]} with gradient_accumulation_steps {saved[1]}; resume with those "
                f"(num_workers may change)",
            )  # fmt: skip
            return
        set_model_state_dict(model, state["model"], options=loading)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=SHARDED)
        schedule.load_state_dict(state["schedule"])
        objective.load_state_dict(state["objective"])
        ema.optimization_step = loop["ema_step"]
        step = loop["step"]
        stream.seek(loop["epoch"], loop["position"])
        if prior_stream is not None:
            prior_stream.seek(loop["prior_epoch"], loop["prior_position"])
        resumed_from = step
        args["console"].say(
            f"[raygen train] rank {rank}: resumed at step {step} from {checkpoint.path}"
        )

    # --- steps ---
    while step < config.max_steps:
        step_start = time.perf_counter()
        data_wait = 0.0
        losses: list[torch.Tensor] = []
        prior_losses: list[torch.Tensor] = []
        extras: Counter[str] = Counter()
        optimizer.zero_grad(set_to_none=True)
        for micro in range(config.gradient_accumulation_steps):
            fetch_start = time.perf_counter()
            arrays = next(stream)
            data_wait += time.perf_counter() - fetch_start
            generator = torch.Generator(device).manual_seed(
                hash((config.seed, rank, step, micro)) % 2**63
            )
            last = micro == config.gradient_accumulation_steps - 1
            batch = plan.model_inputs(arrays, config, generator, device)
            with _no_grad_sync(model, last and prior_stream is None):
                with autocast:
                    loss, metrics = objective.loss(model, batch, generator)
                # A non-finite loss makes non-finite gradients: caught below, before the update.
                (loss / config.gradient_accumulation_steps).backward()
            losses.append(loss.detach())
            extras.update(metrics)
            if prior_stream is not None:
                assert plan.prior is not None
                # Its own generator: the instance batches draw what they would without it.
                prior_generator = torch.Generator(device).manual_seed(
                    hash((config.seed, rank, step, micro, "prior")) % 2**63
                )
                prior_batch = plan.prior.model_inputs(
                    next(prior_stream), config, prior_generator, device
                )
                with _no_grad_sync(model, last):
                    with autocast:
                        prior_loss, _ = objective.loss(model, prior_batch, prior_generator)
                    weight = plan.prior_loss_weight / config.gradient_accumulation_steps
                    (weight * prior_loss).backward()
                prior_losses.append(prior_loss.detach())
        max_norm = optim.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        status = _step_status(
            torch.stack(losses).mean(),
            grad_norm,
            report_due=time.monotonic() - last_report >= config.report_every_s,
        )
        if not (status.loss_finite and status.grad_finite):
            what = "loss" if not status.loss_finite else "gradient norm"
            value = status.loss if not status.loss_finite else status.grad_norm
            _stop(config, rank, step + 1, f"non-finite {what} {value}")
            return
        optimizer.step()
        schedule.step()
        ema.step(params)
        objective.after_optimizer_step(raw_model)
        step += 1

        # --- metrics, samples, checkpoints ---
        step_time = time.perf_counter() - step_start
        eval_due = bool(config.eval_every) and step % config.eval_every == 0
        if step % config.log_every == 0 or step == config.max_steps or eval_due:
            records.append(
                {
                    "step": step,
                    "epoch": stream.epoch,
                    "loss": status.loss,
                    **({"prior_loss": _mean_over_ranks(prior_losses)} if prior_losses else {}),
                    "grad_norm": status.grad_norm,
                    "lr": schedule.get_last_lr()[0],
                    "samples_per_s": config.batch_size / step_time,
                    "step_time_s": step_time,
                    "data_wait_fraction": data_wait / step_time,
                    "time": time.time(),
                    **{k: v / config.gradient_accumulation_steps for k, v in extras.items()},
                    # Where a restart or --resume continued from: what shows in metrics.jsonl
                    # that the steps before it were not recomputed.
                    **({} if resumed_from is None else {"resumed_from_step": resumed_from}),
                }
            )
            resumed_from = None
        if eval_due:
            weights = _ema_weights(model, ema, params)  # a collective under FSDP: every rank
            if rank == 0:
                records[-1].update(plan.prompt_following(objective, weights, config, device))
        if config.sample_every and step % config.sample_every == 0:
            weights = _ema_weights(model, ema, params)
            if rank == 0:
                grid = plan.sample_grid(objective, weights, config, device)
                name = f"samples/step-{step:07d}.png"
                Storage(config.storage).write_bytes(join(config.output, name), grid)
                if records and records[-1]["step"] == step:
                    records[-1]["sample"] = name  # the trackers show it beside the step
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            with tempfile.TemporaryDirectory() as folder:
                # Every rank writes its own shards (__<rank>_0.distcp; rank 0 also .metadata)
                # and reports them: Ray Train copies every rank's files into one checkpoint.
                dcp.save(checkpoint_state(), checkpoint_id=folder)
                ray.train.report({"records": records}, checkpoint=Checkpoint.from_directory(folder))
            records, last_report = [], time.monotonic()
        elif status.report_due and records:
            # Every rank reports on the same steps (``report_due`` is agreed): a collective.
            ray.train.report({"records": records})
            records, last_report = [], time.monotonic()

    # --- the bundle (or the LoRA): EMA weights in the source bundle's layout ---
    weights = _ema_weights(model, ema, params, TRAINED)
    if rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            objective.export(weights, folder)
            Storage(config.storage).upload_dir(folder, join(config.output, objective.output_name))


def _stop(config: LoopConfig, rank: int, step: int, reason: str) -> None:
    """Leave a note for the driver: a non-finite value, or a checkpoint the config cannot
    resume, is not a fault a restart can fix, so the workers return normally (no
    FailureConfig retry) and the driver raises."""
    if rank == 0:
        note = json.dumps({"step": step, "reason": reason}).encode()
        Storage(config.storage).write_bytes(join(config.output, STOPPED), note)


def _to_model_inputs(
    arrays: dict[str, np.ndarray],
    plan: RunPlan,
    caption: str,
    generator: torch.Generator,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Stored latents -> the model's scale; caption choice per row."""
    latents = torch.as_tensor(arrays["latents"], device=device)  # (B, C, h, w) or (B, C, f, h, w)
    latents = plan.family.normalize(latents, plan.vae)
    has_original = torch.as_tensor(arrays["has_original"], device=device)
    has_synthetic = torch.as_tensor(arrays["has_synthetic"], device=device)
    if caption == "mix":
        coin = torch.rand(len(has_original), generator=generator, device=device) < 0.5
        use_synthetic = has_synthetic & (coin | ~has_original)
    elif caption == "synthetic":
        use_synthetic = has_synthetic
    else:
        use_synthetic = ~has_original & has_synthetic
    batch = {"latents": latents}
    for key in ("image_embeds", "image_condition"):  # image-to-video's first frame
        if key in arrays:
            batch[key] = torch.as_tensor(arrays[key], device=device)
    if plan.family.size_conditioning:
        batch["time_ids"] = _time_ids(arrays["size_crop"], latents.shape, plan, device)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if f"{key}_original" in arrays:
            batch[key] = where_rows(
                use_synthetic,
                torch.as_tensor(arrays[f"{key}_synthetic"], device=device),
                torch.as_tensor(arrays[f"{key}_original"], device=device),
            )
    return batch


def _time_ids(
    size_crop: np.ndarray, latent_shape: torch.Size, plan: RunPlan, device: torch.device
) -> torch.Tensor:
    """SDXL's six time ids (B, 6) per row, as diffusers' SDXL training script computes them:
    the original (height, width), the crop's top-left in the resized image, and the target
    (the bucket's size). ``size_crop`` (B, 6): original (height, width) and the crop box
    (top, left, height, width) in original pixels, which prep resized to the bucket."""
    target_h, target_w = (side * plan.latent_downscale for side in latent_shape[-2:])
    rows = []
    for original_h, original_w, top, left, crop_h, crop_w in size_crop.tolist():
        crop_top_left = (round(top * target_h / crop_h), round(left * target_w / crop_w))
        rows.append(
            plan.family.time_ids((original_h, original_w), crop_top_left, (target_h, target_w))
        )
    return torch.tensor(rows, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------
# Sample grids and the loss curve.
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def sample_grid(
    objective: Objective,
    plan: RunPlan,
    weights: dict[str, torch.Tensor],
    config: LoopConfig,
    device: torch.device,
) -> bytes:
    """PNG of the fixed sample captions, generated with the given (EMA) weights."""
    pipe = _embeddings_pipeline(objective, plan, weights, device)
    n = len(plan.samples["prompt_embeds_original"])
    prompt = np.where(
        plan.samples["has_synthetic"].reshape(
            n, *[1] * (plan.samples["prompt_embeds_synthetic"].ndim - 1)
        ),
        plan.samples["prompt_embeds_synthetic"],
        plan.samples["prompt_embeds_original"],
    )
    kwargs = {
        "prompt_embeds": torch.from_numpy(prompt).to(device),
        "negative_prompt_embeds": torch.from_numpy(plan.empty_prompt["prompt_embeds"])
        .expand(n, -1, -1)
        .to(device),
    }
    if "pooled_prompt_embeds" in plan.empty_prompt:
        pooled = np.where(
            plan.samples["has_synthetic"][:, None],
            plan.samples["pooled_prompt_embeds_synthetic"],
            plan.samples["pooled_prompt_embeds_original"],
        )
        kwargs["pooled_prompt_embeds"] = torch.from_numpy(pooled).to(device)
        kwargs["negative_pooled_prompt_embeds"] = (
            torch.from_numpy(plan.empty_prompt["pooled_prompt_embeds"]).expand(n, -1).to(device)
        )
    bucket = BucketKey.parse(plan.sample_bucket)
    if bucket.num_frames is not None:
        kwargs["num_frames"] = bucket.num_frames
    settings = {
        "height": bucket.height,
        "width": bucket.width,
        "num_inference_steps": config.sample_steps,
        "guidance_scale": config.sample_guidance_scale,
        "output_type": "pil",
    }
    if plan.family.conditions_on_image:
        # Each sample animates its clip's first frame, one call each (the pipeline takes one
        # image per call); the grid shows each video's last frame, the one furthest from it.
        images = []
        for i, first in enumerate(_first_frames(pipe, plan)):
            one = {key: value[i : i + 1] for key, value in kwargs.items() if key != "num_frames"}
            out = pipe(
                image=first,
                **one,
                num_frames=kwargs["num_frames"],
                **settings,
                generator=torch.Generator(device).manual_seed(config.seed + i),
            )
            images.append(out.frames[0][-1])
    else:
        out = pipe(**kwargs, **settings, generator=torch.Generator(device).manual_seed(config.seed))
        images = out.images if plan.media == "image" else [frames[0] for frames in out.frames]
    if not isinstance(images[0], Image.Image):  # Wan returns arrays in [0, 1]
        images = [Image.fromarray((np.asarray(im) * 255).round().astype(np.uint8)) for im in images]
    return png_bytes(_grid(images))


def _first_frames(pipe: Any, plan: RunPlan) -> list[Image.Image]:
    """The sample clips' first frames, decoded from their stored first-frame latents (an
    image-to-video shard's ``image_condition``: the mask's 4 channels, then the normalised
    latents, whose first latent frame a causal VAE encodes from the first frame alone)."""
    condition = torch.from_numpy(plan.samples["image_condition"])  # (N, 4 + C, f, h, w)
    latents = condition[:, 4:, :1].to(pipe.vae.device, pipe.vae.dtype)  # (N, C, 1, h, w)
    latents = plan.family.denormalize(latents, pipe.vae.config)
    frames = pipe.vae.decode(latents, return_dict=False)[0]  # (N, 3, 1, H, W)
    return [frames[0] for frames in pipe.video_processor.postprocess_video(frames, "pil")]


def _embeddings_pipeline(
    objective: Objective, plan: RunPlan, weights: dict[str, torch.Tensor], device: torch.device
) -> Any:
    """The bundle's pipeline with the given (EMA) weights and no text encoders: its prompts
    are stored embeddings (an image-to-video bundle's image encoder stays: its pipeline takes
    the image itself)."""
    transformer = unwrapped_copy(objective.model)
    transformer.load_state_dict(weights)
    transformer.to(device).eval()
    family = plan.family
    unloaded = family.unloaded("denoisers", "vae", "image_encoders")
    pipe = family.pipeline.from_pretrained(
        plan.bundle_dir, **unloaded, **{family.denoisers[0]: transformer}
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def held_out_images(
    objective: Objective,
    plan: RunPlan,
    weights: dict[str, torch.Tensor],
    config: LoopConfig,
    device: torch.device,
) -> list[tuple[str, int, np.ndarray]]:
    """The held-out prompts x ``eval_seeds`` generated with the given (EMA) weights, each
    image with a generator seeded by its seed alone, as `raygen evaluate` makes them:
    (prompt, seed, (H, W, 3) uint8) in evaluate's order (prompt-major)."""
    pipe = _embeddings_pipeline(objective, plan, weights, device)
    prompts = len(plan.eval_prompts)
    embeddings = {
        "prompt_embeds": plan.eval_embeddings["prompt_embeds"],
        "negative_prompt_embeds": np.broadcast_to(
            plan.empty_prompt["prompt_embeds"], plan.eval_embeddings["prompt_embeds"].shape
        ),
    }
    if "pooled_prompt_embeds" in plan.eval_embeddings:
        embeddings["pooled_prompt_embeds"] = plan.eval_embeddings["pooled_prompt_embeds"]
        embeddings["negative_pooled_prompt_embeds"] = np.broadcast_to(
            plan.empty_prompt["pooled_prompt_embeds"],
            plan.eval_embeddings["pooled_prompt_embeds"].shape,
        )
    tensors = {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in embeddings.items()
    }
    bucket = BucketKey.parse(plan.sample_bucket)
    by_seed = []
    for seed in range(config.eval_seeds):
        images = pipe(
            **tensors,
            height=bucket.height,
            width=bucket.width,
            num_inference_steps=config.sample_steps,
            guidance_scale=config.sample_guidance_scale,
            generator=[torch.Generator(device).manual_seed(seed) for _ in range(prompts)],
            output_type="np",
        ).images  # (P, H, W, 3) in [0, 1]
        by_seed.append((np.asarray(images) * 255).round().astype(np.uint8))
    return [
        (prompt, seed, by_seed[seed][index])
        for index, prompt in enumerate(plan.eval_prompts)
        for seed in range(config.eval_seeds)
    ]


def prompt_following(
    objective: Objective,
    plan: RunPlan,
    weights: dict[str, torch.Tensor],
    config: LoopConfig,
    device: torch.device,
) -> dict[str, float]:
    """`raygen evaluate`'s prompt following, in the loop: ``held_out_images`` read back by
    the shapes detector. ``eval_{color,shape,place,all}``: the share of images right."""
    verdicts = []
    for prompt, _, image in held_out_images(objective, plan, weights, config, device):
        caption = ShapeCaption.parse(prompt)
        assert caption is not None  # HELD_OUT's own texts
        verdicts.append(detect_image(image).matches(caption))
    scores = {f"eval_{c}": float(np.mean([v[c] for v in verdicts])) for c in verdicts[0]}
    scores["eval_all"] = float(np.mean([all(v.values()) for v in verdicts]))
    return scores


def _grid(images: list[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------------------
# The driver.
# ----------------------------------------------------------------------------------------


@dataclass
class RunResult:
    output: str
    bundle: str
    steps: int
    metrics: dict[str, Any]
    checkpoint: str | None


def _fit(trainer: ray.train.torch.TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``, leaving SIGINT's handler as it found it. Ray Train installs a handler
    that holds the run's controller: left in place, it keeps the finished run's controller
    (and its dataset manager) alive in the driver until another run replaces it."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def plan_shards(
    config: LoopConfig, bundle_uri: str, label: str, media: tuple[str, ...] = ("image", "video")
) -> RunPlan:
    """``plan_run`` for an objective that trains ``media`` (a bundle of another kind is a
    config error naming it)."""
    storage = Storage(config.storage)
    storage.check(config.output)
    plan = plan_run(config, bundle_uri, storage)
    if plan.media not in media:
        raise ConfigError(
            f"{'teacher' if label == 'distill' else 'bundle'}: {bundle_uri} is a "
            f"{plan.transformer_class} ({plan.media}); {label} takes {' or '.join(media)} models"
        )
    return plan


def run_loop(
    config: LoopConfig, plan: DataPlan, objective: Callable[..., Objective], label: str
) -> RunResult:
    """Start the Ray Train run of ``plan`` and wait for it: what training, distillation and
    the autoencoder share."""
    storage = Storage(config.storage)
    storage.check(config.output)
    run_state = join(config.output, RUN_NAME, "checkpoint_manager_snapshot.json")
    if storage.exists(run_state) and not config.resume:
        raise TrainingError(
            f"output: {config.output} already holds a run; pass --resume (resume: true) to "
            f"continue it, or choose another output"
        )
    if storage.exists(join(config.output, STOPPED)):
        storage.delete(join(config.output, STOPPED))  # a resumed run gets another chance
    history = []
    if config.resume and storage.exists(join(config.output, "metrics.jsonl")):
        text = storage.read_bytes(join(config.output, "metrics.jsonl")).decode()
        history = [json.loads(line) for line in text.splitlines() if line.strip()]

    check_installed(config.tracking)
    init_ray(config.ray)
    if plan.streams_data:
        _check_cpus_for_reads(config)  # held buckets are read by the workers themselves
    fs, root = storage.filesystem(config.output)
    print(
        f"[raygen {label}] {plan.describe()} from {plan.bundle_uri}: {config.num_workers} "
        f"workers x {plan.batch_per_worker} x {config.gradient_accumulation_steps} accumulation",
        flush=True,
    )
    console = DriverConsole()
    # Ray Train's controller unpickles train_loop_config. The plan and the objective are
    # classes of torch-importing modules (this one, flows.distill): passed by reference, they
    # are unpickled only by the workers, and the controller starts without importing torch
    # (~10 s of CPU before any worker starts, measured on 2 cores).
    run = ray.put({"plan": plan, "objective": objective})
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "config_cls": type(config),
            "run": run,
            "console": console,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={
                "CPU": config.cpus_per_worker,
                **({"GPU": 1} if config.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
            callbacks=[
                MetricsLog(
                    config.output,
                    storage,
                    config.max_steps,
                    history,
                    console,
                    tracking=config.tracking,
                    params={"flow": label, **config.model_dump(mode="json")},
                )
            ],
        ),
        datasets=plan.datasets(storage),
    )
    with console.shown():
        result = _fit(trainer)
    metrics = ((result.metrics or {}).get("records") or [{}])[-1]
    if storage.exists(join(config.output, STOPPED)):
        stopped = json.loads(storage.read_bytes(join(config.output, STOPPED)))
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(
            f"{label} stopped at step {stopped['step']}: {stopped['reason']}; "
            f"the last good checkpoint stays: {last}"
        )
    return RunResult(
        output=config.output,
        bundle=join(config.output, "bundle"),
        steps=int(metrics.get("step", 0)),
        metrics=metrics,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
    )


def _check_cpus_for_reads(config: LoopConfig) -> None:
    """Ray Data lists shard files with a task that takes one whole CPU; training workers that
    hold the rest would leave it pending forever (no error, no progress). A fixed-size local
    Ray is where that can be known up front; a cluster's autoscaler may add CPUs."""
    if config.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    cpus = ray.cluster_resources().get("CPU", 0.0)
    left = cpus - config.num_workers * config.cpus_per_worker
    if left < 1:
        raise ConfigError(
            f"cpus_per_worker: {config.num_workers} workers x {config.cpus_per_worker:g} CPUs "
            f"leave {left:g} of local Ray's {cpus:g}; Ray Data's shard reads need 1 "
            f"(lower cpus_per_worker or num_workers, or raise ray.num_cpus)"
        )


def plan_prior(config: TrainConfig, plan: RunPlan) -> RunPlan:
    """The class images' plan for prior preservation: the same bundle, held in memory (a
    DreamBooth class set is hundreds of images), checked as the instance shards are."""
    assert config.prior is not None
    storage = Storage(config.storage)
    update = {"data": config.prior.data, "eval_every": 0}
    try:
        prior = plan_run(config.model_copy(update=update), plan.bundle_uri, storage)
    except ConfigError as err:
        raise ConfigError(f"prior.{err}") from None  # "prior.data: ..." names the field
    if prior.media != plan.media:
        raise ConfigError(
            f"prior.data: {config.prior.data} holds {prior.media}s, not {plan.media}s"
        )
    if prior.streams_data:
        raise ConfigError(
            f"prior.data: {config.prior.data} holds more than in_memory_bucket_bytes "
            f"({config.in_memory_bucket_bytes} bytes) in a bucket; prior preservation keeps "
            f"its class images in the workers' memory"
        )
    return prior


def run_train(config: TrainConfig) -> RunResult:
    plan = plan_shards(config, config.bundle.uri, "train")
    if config.prior is not None:
        plan.prior = plan_prior(config, plan)
        plan.prior_loss_weight = config.prior.loss_weight
    result = run_loop(config, plan, training_objective(plan.family), "train")
    if config.adapter is not None:
        result = dataclasses.replace(result, bundle=join(config.output, "adapter"))
        print(
            f"[raygen train] {result.steps} steps; LoRA (rank {config.adapter.rank}) for "
            f"{config.bundle.uri}: {result.bundle}",
            flush=True,
        )
    else:
        print(f"[raygen train] {result.steps} steps; bundle: {result.bundle}", flush=True)
    return result
