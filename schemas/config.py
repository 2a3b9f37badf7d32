"""Run configs: one typed pydantic model per flow, loadable from YAML, overridable from the CLI.

Every model forbids unknown keys, so a typo in a YAML file or a `--set` path is an error
that names the key and the file instead of a silently ignored setting. Defaults are the
embedded ones: local Ray, local storage under ``./raygen-data``, tiny bundles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.errors import RaygenError

DEFAULT_DATA_ROOT = "./raygen-data"


class ConfigError(RaygenError):
    """A config the user wrote cannot be used; the message names the file and the key."""


class Config(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Config):
    """Where data lives: a local path or ``s3://bucket/prefix``.

    Credentials always come from the standard AWS chain (environment, profile, instance or
    pod role) and are never part of a config, so a config file can be shared and logged.
    """

    endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, Ceph RGW); default: AWS, or $AWS_ENDPOINT_URL",
    )
    region: str | None = Field(default=None, description="default: the AWS chain's region")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1, description="attempts per S3 request")
    multipart_threshold_mb: int = Field(default=64, ge=5, description="larger uploads go multipart")
    cache_dir: str = Field(
        default="~/.cache/raygen",
        description="local cache of bundles downloaded from s3://, keyed by content",
    )


class RayConfig(Config):
    """Which Ray to run on: a local one started in-process, or an existing cluster."""

    address: str | None = Field(
        default=None,
        description="'auto', ray://host:10001 or host:6379; default: $RAY_ADDRESS, else a local Ray",
    )
    num_cpus: int | None = Field(default=None, ge=1, description="local Ray only")
    num_gpus: int | None = Field(default=None, ge=0, description="local Ray only")
    namespace: str = "raygen"


class ModelRef(Config):
    """A model bundle in diffusers' folder layout, local or on ``s3://``."""

    uri: str = Field(description="bundle folder: a local path or s3://bucket/prefix")
    device: str = Field(default="cpu", description="'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("uri")
    @classmethod
    def _uri_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("bundle uri is empty")
        return value


def _bundle(name: str) -> ModelRef:
    return ModelRef(uri=f"{DEFAULT_DATA_ROOT}/bundles/{name}")


class StageResources(Config):
    """How one prep stage runs on Ray Data: its pool size, batch size and per-actor resources.

    A laptop and a 100-GPU cluster differ only here.
    """

    concurrency: int = Field(default=1, ge=1, description="actors in the stage's pool")
    batch_size: int = Field(default=8, ge=1, description="rows per call")
    # A quarter CPU each, so every stage's pool (seven actors by default) fits on a 2-core
    # laptop at once; Ray Data's streaming needs them all alive together.
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class DecodeConfig(Config):
    """Decoding and validating images and videos; what fails here is quarantined."""

    min_side: int = Field(default=16, ge=1, description="shorter side below this: quarantined")
    max_pixels: int = Field(
        default=89_478_485, ge=1, description="larger images are decompression bombs (PIL's limit)"
    )
    max_bytes: int = Field(default=2**30, ge=1, description="larger files are quarantined")
    video_fps: float = Field(default=8.0, gt=0, description="frames are sampled at this rate")
    video_num_frames: int = Field(
        default=9,
        ge=1,
        description="frames per clip; the video bundle's VAE fixes which (Wan: 4k+1), "
        "checked when prep starts",
    )
    video_max_clips: int = Field(default=4, ge=1, description="clips kept per video")
    shot_threshold: float = Field(
        default=0.35, gt=0, le=1, description="mean abs frame difference that starts a new shot"
    )
    resources: StageResources = Field(default_factory=StageResources)


class BucketConfig(Config):
    """SDXL-style aspect-ratio buckets: about ``resolution**2`` pixels, sides a multiple of
    ``step``, which must be a multiple of the bundles' VAE downscale times their transformers'
    patch size so training can patch every latent."""

    resolution: int = Field(default=64, ge=8)
    step: int | None = Field(
        default=None,
        ge=1,
        description="null: the bundles' own multiple (VAE downscale x patch size), "
        "read from their configs when prep starts",
    )
    max_aspect: float = Field(default=2.0, ge=1.0, description="widest and tallest bucket")


class FilterConfig(Config):
    """Optional filters: rows below a threshold are counted and written to the filtered table."""

    min_resolution: int = Field(default=0, ge=0, description="shorter side in pixels; 0: off")
    scorer: ModelRef | None = Field(default_factory=lambda: _bundle("scorer"))
    min_clip_score: float | None = Field(default=None, description="None: score, don't filter")
    aesthetic: ModelRef | None = Field(default=None, description="image-classification bundle")
    min_aesthetic_score: float | None = None
    nsfw: ModelRef | None = Field(default=None, description="image-classification bundle")
    max_nsfw_score: float | None = None
    resources: StageResources = Field(default_factory=StageResources)


class CaptionConfig(Config):
    """Recaptioning with a vision-language model; ``model: null`` keeps original captions only."""

    model: ModelRef | None = Field(default_factory=lambda: _bundle("captioner"))
    prompt: str | None = Field(default=None, description="text prefix for conditional captioning")
    max_new_tokens: int = Field(default=30, ge=1)
    resources: StageResources = Field(default_factory=StageResources)


class EncodeConfig(Config):
    """Text and pixel encoding with the bundle's own encoders and VAE."""

    text: Literal["embeddings", "tokens"] = "embeddings"
    max_sequence_length: int = Field(default=77, ge=1, description="T5 tokens per caption")
    latent_std: bool = Field(default=False, description="also store the latent distribution's std")
    resources: StageResources = Field(default_factory=StageResources)


class PrepConfig(Config):
    """`raygen prep`: a raw corpus in, training shards and a manifest out."""

    input: str = Field(
        default=f"{DEFAULT_DATA_ROOT}/corpus",
        description="folder or s3:// prefix of media (+ .txt sidecars, WebDataset .tar), "
        "or a .parquet / .jsonl listing with `uri` and optional `caption` columns",
    )
    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/shards")
    bundle: ModelRef = Field(
        default_factory=lambda: _bundle("t2i"), description="images: its VAE and text encoders"
    )
    video_bundle: ModelRef | None = Field(
        default_factory=lambda: _bundle("t2v"), description="videos: its VAE and text encoder"
    )
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    rows_per_file: int = Field(default=256, ge=1, description="rows per shard file, at most")
    write_concurrency: int = Field(default=1, ge=1, description="parallel shard writers")
    small_corpus_inputs: int = Field(
        default=64,
        ge=0,
        description="up to this many inputs the model stages share one actor: start-up, not "
        "throughput, is what such a job waits for; 0: one actor pool per stage always",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class OptimizerConfig(Config):
    """AdamW with linear warmup then cosine decay, and gradient-norm clipping."""

    learning_rate: float = Field(default=1e-4, gt=0, description="peak, reached after warmup")
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(default=2, ge=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine floor / peak")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="None: no clipping")


class TrackingConfig(Config):
    """Where a run's curves, held-out scores and sample grids go besides metrics.jsonl."""

    tensorboard: bool = Field(default=True, description="event files in {output}/tensorboard")
    mlflow: str | None = Field(
        default=None,
        description="an MLflow tracking URI (http://mlflow:5000, databricks, or a local "
        "file:/path/mlruns); needs `pip install mlflow-skinny`",
    )
    wandb: str | None = Field(
        default=None, description="a Weights & Biases project; needs `pip install wandb`"
    )
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="default: $WANDB_MODE, else online"
    )
    experiment: str = Field(default="raygen", description="the MLflow experiment")
    run_name: str | None = Field(default=None, description="default: the output folder's name")


class LoopConfig(Config):
    """What every Ray Train run shares (training and distillation): workers, batching, the
    optimizer, checkpoints, faults, metrics. One loop in flows/train.py reads it."""

    data: str = Field(default=f"{DEFAULT_DATA_ROOT}/shards", description="`raygen prep` output")
    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/runs/train")
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        default=0.5,
        gt=0,
        description="Ray CPUs per worker (torch threads: rounded up); leave some for the reads",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="fsdp shards parameters, gradients and optimizer state"
    )
    batch_size: int = Field(default=4, ge=1, description="global samples per optimizer step")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    max_steps: int = Field(default=20, ge=1, description="optimizer steps")
    caption: Literal["original", "synthetic", "mix"] = Field(
        default="mix", description="which caption's embeddings; mix: synthetic half the time"
    )
    shuffle_buffer: int = Field(
        default=64, ge=0, description="rows in the local shuffle buffer (streamed buckets)"
    )
    in_memory_bucket_bytes: int = Field(
        default=512 * 2**20,
        ge=0,
        description=(
            "a bucket whose shards hold at most this many bytes (uncompressed) is read once, "
            "each worker holding its share in memory, and reshuffled there every epoch; larger "
            "buckets stream through Ray Data. 0: stream every bucket"
        ),
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    checkpoint_every: int = Field(default=10, ge=1)
    checkpoints_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=3, ge=0, description="worker-group restarts per run")
    log_every: int = Field(default=1, ge=1, description="steps between metric records")
    report_every_s: float = Field(
        default=5.0,
        ge=0,
        description=(
            "seconds between sending the records to the driver (progress line, metrics.jsonl); "
            "0: every record. A report is a Ray Train collective and the controller takes one "
            "per 2 s poll, so reporting every fast step would stall training"
        ),
    )
    sample_every: int = Field(default=0, ge=0, description="steps between sample grids; 0: off")
    num_samples: int = Field(default=4, ge=1, description="grid size: fixed captions from data")
    sample_steps: int = Field(default=8, ge=1)
    sample_guidance_scale: float = Field(default=4.5, ge=0)
    eval_every: int = Field(
        default=0,
        ge=0,
        description="steps between prompt-following scores of the EMA weights on the shapes "
        "held-out prompts (raygen evaluate's detector; sample_steps, sample_guidance_scale), "
        "logged beside the loss; 0: off",
    )
    eval_seeds: int = Field(default=2, ge=1, description="images per held-out prompt there")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = 0
    resume: bool = Field(default=False, description="continue from the latest checkpoint")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class AdapterConfig(Config):
    """A LoRA trained instead of the whole transformer (peft, as diffusers' training examples
    add it): only its matrices train, in fp32; checkpoints hold them and their optimizer."""

    kind: Literal["lora"] = "lora"
    rank: int = Field(default=4, ge=1)
    alpha: float | None = Field(default=None, gt=0, description="default: rank (scale 1)")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # diffusers' SD3 DreamBooth-LoRA choice: the attention projections (Wan's too).
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"], min_length=1
    )


class PriorConfig(Config):
    """DreamBooth's prior preservation: batches of class images (`raygen sample` from the
    base model, then `raygen prep`) trained beside the instance images, their loss weighted
    by ``loss_weight``, so the class ("a dog") keeps what the base model drew for it."""

    data: str = Field(description="`raygen prep` output of the class images")
    loss_weight: float = Field(default=1.0, ge=0, description="diffusers' prior_loss_weight")


class TrainConfig(LoopConfig):
    """`raygen train`: shards in, a diffusers bundle out.

    The bundle gives the model family (SD3 or Flux for images, Wan for video), the scheduler,
    VAE and text encoders the output bundle carries; ``init`` says whether its transformer
    weights are fine-tuned or the transformer is trained from scratch (with
    ``transformer_config`` overrides of the bundle's transformer config)."""

    bundle: ModelRef = Field(default_factory=lambda: _bundle("t2i"))
    init: Literal["bundle", "scratch"] = "bundle"
    transformer_config: dict[str, Any] = Field(
        default_factory=dict, description="scratch only: overrides of the transformer config"
    )
    cfg_dropout: float = Field(default=0.1, ge=0, le=1, description="empty-prompt probability")
    logit_mean: float = Field(default=0.0, description="logit-normal timestep sampling (SD3)")
    logit_std: float = Field(default=1.0, gt=0)
    guidance_scale: float = Field(
        default=3.5,
        ge=0,
        description="the guidance a guidance-embedding transformer (Flux dev) is given while "
        "training, as diffusers' Flux training scripts do; other transformers take none",
    )
    snr_gamma: float | None = Field(
        default=None,
        gt=0,
        description="min-SNR loss weighting for noise-prediction families (SDXL; 5.0 is the "
        "paper's); null: plain MSE",
    )
    adapter: AdapterConfig | None = Field(
        default=None,
        description="train a LoRA on the bundle's transformer (written to <output>/adapter) "
        "instead of the transformer itself",
    )
    prior: PriorConfig | None = Field(
        default=None, description="DreamBooth's prior preservation: class-image shards"
    )

    @model_validator(mode="after")
    def _adapter_on_trained_weights(self) -> TrainConfig:
        if self.adapter is not None and self.init == "scratch":
            raise ValueError(
                "adapter: a LoRA adapts the bundle's trained weights; use init: bundle"
            )
        return self


class DistillConfig(LoopConfig):
    """`raygen distill`: a teacher bundle and shards in, a few-step student bundle out."""

    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/runs/distill")
    teacher: ModelRef = Field(default_factory=lambda: _bundle("t2i"))
    student_steps: int = Field(default=4, ge=1, le=8, description="the student's sampling steps")
    guidance_scale: float = Field(default=4.5, ge=1, description="teacher CFG folded into student")
    # 16 teacher steps and a fast target (0.5) converged about twice as fast as LCM's 32 / 0.95
    # on the tiny SD3 in a fixed step budget (tests/flows/test_distill.py).
    num_teacher_steps: int = Field(default=16, ge=2, description="teacher ODE grid")
    target_ema_decay: float = Field(default=0.5, ge=0, lt=1, description="consistency target")
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(learning_rate=1e-5))
    # Grids show the student as served: its own steps, guidance folded in.
    sample_steps: int = Field(default=4, ge=1)
    sample_guidance_scale: float = Field(default=1.0, ge=0)


class AutoencoderConfig(LoopConfig):
    """`raygen vae`: a corpus in, the bundle with its autoencoder (AutoencoderKL) trained out.

    The corpus is read like prep's input and decoded by prep's own stages, square images of
    ``resolution`` pixels, streamed to the workers by Ray Data. The output bundle is the
    source bundle with the new VAE, whose ``scaling_factor`` and ``shift_factor`` are
    recomputed from its latents on ``statistics_rows`` images of the corpus (as SD3's were)."""

    data: str = Field(
        default=f"{DEFAULT_DATA_ROOT}/corpus",
        description="a corpus: folder, s3:// prefix or listing, as `raygen prep --input` takes",
    )
    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/runs/vae")
    bundle: ModelRef = Field(default_factory=lambda: _bundle("t2i"))
    init: Literal["bundle", "scratch"] = "bundle"
    vae_config: dict[str, Any] = Field(
        default_factory=dict, description="scratch only: overrides of the bundle's VAE config"
    )
    resolution: int = Field(default=64, ge=8, description="side of the square training images")
    kl_weight: float = Field(default=1e-6, ge=0, description="KL term against reconstruction")
    statistics_rows: int = Field(
        default=64, ge=2, description="images whose latents set scaling_factor / shift_factor"
    )
    # Decoding small images is milliseconds a batch; larger batches than prep's default cut
    # Ray Data's per-task cost (2000 64 px images: 4.5-9 s at 64 a batch).
    decode: DecodeConfig = Field(
        default_factory=lambda: DecodeConfig(resources=StageResources(batch_size=64))
    )
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(learning_rate=1e-3))
    # Small corpora are decoded once and held in Ray's object store instead of re-decoded
    # every epoch: at most this many bytes of pixels (estimated from the inputs).
    in_memory_bucket_bytes: int = Field(default=512 * 2**20, ge=0)


EVAL_METRICS = ("prompt_following", "clip_score", "fid")


class FidConfig(Config):
    """FID against reference images, with torchmetrics' FrechetInceptionDistance. Its features
    come from ``feature_extractor`` (a TorchScript file: uint8 images (N, 3, H, W) -> (N, D)
    features) or else from Inception-v3 with torch-fidelity's weights at ``inception``
    (pt_inception-2015-12-05-6726825d.pth; needs `pip install torch-fidelity`). Weights are
    never downloaded: with neither, or no ``reference``, FID is skipped with its reason."""

    reference: str | None = Field(
        default=None, description="reference images: a folder, s3:// prefix or listing"
    )
    inception: str | None = Field(default=None, description="local Inception-v3 weights file")
    feature_extractor: str | None = Field(default=None, description="TorchScript file")
    max_reference_images: int = Field(default=10_000, ge=2)


class SamplingConfig(Config):
    """Prompts x seeds -> images (videos for a video bundle) from a bundle's own diffusers
    pipeline in Ray Data actors, batched, a generator per row seeded by its seed: what
    `raygen evaluate` and `raygen sample` share. Settings left None take the bundle's own: a
    distilled bundle's raygen_sampling.json, else the pipeline's defaults."""

    bundle: ModelRef = Field(default_factory=lambda: _bundle("t2i"))
    seeds: int = Field(default=4, ge=1, description="images per prompt, seeds 0 .. seeds-1")
    height: int = Field(default=64, ge=8)
    width: int = Field(default=64, ge=8)
    num_inference_steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0)
    max_sequence_length: int = Field(default=77, ge=1, description="T5 tokens per prompt")
    num_frames: int = Field(
        default=9, ge=1, description="video bundles: frames per video (Wan: 4k + 1)"
    )
    fps: int = Field(default=8, ge=1, description="video bundles: of the MP4s written")
    generate: StageResources = Field(
        default_factory=lambda: StageResources(batch_size=8, num_cpus=1.0),
        description="the actors holding the pipeline",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)


class EvaluateConfig(SamplingConfig):
    """`raygen evaluate`: prompts x seeds -> images from a bundle (or a running server) ->
    scores and a report. A video bundle (Wan) makes videos, scored for their direction of
    motion too; its default prompts are the shapes video prompts.

    Prompt following is read from pixels by the shapes detector (actors/shape_detector.py),
    GenEval-style, for prompts of the shapes domain; CLIP score is torchmetrics' CLIPScore
    with the ``clip`` bundle's model."""

    url: str | None = Field(
        default=None,
        description="a running `raygen serve` to generate through (POST /v1/generate) instead "
        "of the bundle; its API key, if it wants one, from $RAYGEN_API_KEY",
    )
    request_timeout_s: float = Field(default=300.0, gt=0, description="per request, with url")
    prompts: str | None = Field(
        default=None,
        description="a text file of prompts, one a line; default: the shapes held-out prompts",
    )
    metrics: list[str] = Field(default_factory=lambda: list(EVAL_METRICS))
    clip: ModelRef | None = Field(
        default_factory=lambda: _bundle("scorer"),
        description="a CLIP model folder (transformers) for clip_score",
    )
    fid: FidConfig = Field(default_factory=FidConfig)
    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/eval")

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, metrics: list[str]) -> list[str]:
        unknown = [name for name in metrics if name not in EVAL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric {unknown[0]!r}; known: {', '.join(EVAL_METRICS)}")
        if not metrics:
            raise ValueError(f"no metric; known: {', '.join(EVAL_METRICS)}")
        return metrics


class SampleConfig(SamplingConfig):
    """`raygen sample`: a bundle's images for prompts x seeds written as a corpus (each image
    beside a ``.txt`` caption, its prompt) that `raygen prep` reads: DreamBooth's class
    images for prior preservation, or synthetic data. ``first_seed`` keeps them apart from
    the seeds an evaluation uses."""

    prompt: str | None = Field(default=None, description="one prompt (or prompts: a file)")
    prompts: str | None = Field(default=None, description="a text file of prompts, one a line")
    first_seed: int = Field(default=1000, ge=0, description="seeds first_seed .. + seeds - 1")
    output: str = Field(default=f"{DEFAULT_DATA_ROOT}/samples")


class AutoscalingConfig(Config):
    """Ray Serve autoscaling of one stage: replicas follow the requests in flight per replica.

    ``min_replicas: 0`` scales the stage to zero when idle; the next request starts one.
    """

    min_replicas: int = Field(default=1, ge=0)
    initial_replicas: int | None = Field(default=None, ge=0, description="default: min_replicas")
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="per replica")
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    # Load reaches the autoscaler every metrics_interval_s, averaged over the last
    # look_back_period_s: together with the delays, how fast the replica count follows load.
    metrics_interval_s: float = Field(default=10.0, gt=0, description="how often load is reported")
    look_back_period_s: float = Field(default=30.0, gt=0, description="load averaged over this")

    @field_validator("max_replicas")
    @classmethod
    def _max_not_below_min(cls, value: int, info: Any) -> int:
        minimum = info.data.get("min_replicas")
        if minimum is not None and value < minimum:
            raise ValueError(f"max_replicas {value} is below min_replicas {minimum}")
        return value

    @field_validator("look_back_period_s")
    @classmethod
    def _window_spans_reports(cls, value: float, info: Any) -> float:
        interval = info.data.get("metrics_interval_s")
        if interval is not None and value <= interval:
            raise ValueError(
                f"look_back_period_s {value} must exceed metrics_interval_s {interval}"
            )
        return value


class DeploymentSettings(Config):
    """How one serving stage runs as a Ray Serve deployment: replicas, resources, queues and
    (for the text encoders and the denoisers) dynamic batching.

    A laptop and a GPU cluster differ only here (``num_gpus: 1`` and ``device: cuda`` on the
    stage's model).
    """

    num_replicas: int = Field(default=1, ge=1, description="fixed count when autoscaling is null")
    autoscaling: AutoscalingConfig | None = None
    # A tenth of a CPU each, so the whole graph fits a 2-core laptop.
    num_cpus: float = Field(default=0.1, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources per replica; e.g. {node:__internal_head__: 0.01} "
        "keeps a stage on the head, where a GPU node's loss cannot take it down",
    )
    max_ongoing_requests: int = Field(default=8, ge=1, description="in flight per replica")
    max_queued_requests: int = Field(
        default=64, ge=1, description="waiting for a replica; beyond them: 503 with Retry-After"
    )
    max_batch_size: int = Field(default=4, ge=1, description="batched stages only")
    batch_wait_timeout_s: float = Field(
        default=0.01, ge=0, description="batched stages only: how long a batch waits to fill"
    )
    health_check_period_s: float = Field(
        default=10.0, gt=0, description="a dead replica is noticed and replaced within about this"
    )

    @field_validator("max_batch_size")
    @classmethod
    def _batch_fits_in_flight(cls, value: int, info: Any) -> int:
        ongoing = info.data.get("max_ongoing_requests")
        if ongoing is not None and value > ongoing:
            # A replica never holds more requests than max_ongoing_requests, so a larger batch
            # could never fill.
            raise ValueError(f"max_batch_size {value} exceeds max_ongoing_requests {ongoing}")
        return value


class ModelDeployments(Config):
    """The deployments of one served model's own stages."""

    # Drives each image request through the stages; it holds no model, only their calls.
    graph: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(max_ongoing_requests=32)
    )
    text_encoder: DeploymentSettings = Field(default_factory=DeploymentSettings)
    base: DeploymentSettings = Field(default_factory=DeploymentSettings)
    refiner: DeploymentSettings = Field(default_factory=DeploymentSettings)
    vae_decode: DeploymentSettings = Field(default_factory=DeploymentSettings)


class ServeDeployments(ModelDeployments):
    """One deployment per stage of the serving graph: the main model's stages, and the
    server's own (ingress, safety)."""

    ingress: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(max_ongoing_requests=32)
    )
    safety: DeploymentSettings = Field(default_factory=DeploymentSettings)


class SuperResolutionStage(Config):
    """One x4 super-resolution stage (a StableDiffusionUpscalePipeline bundle)."""

    model: ModelRef = Field(default_factory=lambda: _bundle("upscaler"))
    noise_level: int = Field(
        default=20, ge=0, description="conditioning augmentation: noise added to the low-res input"
    )
    num_inference_steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=0.0, ge=0)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)


class SafetyConfig(Config):
    """Prompt filter before any model runs; image check and invisible watermark after decode."""

    blocklist: list[str] = Field(
        default_factory=list,
        description="words or phrases; a prompt containing one (any case) is refused",
    )
    image_checker: ModelRef | None = Field(
        default=None, description="image-classification bundle with an 'nsfw' label; null: off"
    )
    max_nsfw_score: float = Field(
        default=0.5, ge=0, le=1, description="images scoring above it are replaced by black"
    )
    watermark_key: str = Field(
        default="raygen", min_length=1, description="the watermark's bits derive from it"
    )


class VideoDeployments(Config):
    """One deployment per stage of the video graph; ``jobs`` holds the job records and
    drives each job, so it has exactly one replica."""

    jobs: DeploymentSettings = Field(default_factory=DeploymentSettings)
    text_encoder: DeploymentSettings = Field(default_factory=DeploymentSettings)
    denoiser: DeploymentSettings = Field(default_factory=DeploymentSettings)
    vae_decode: DeploymentSettings = Field(default_factory=DeploymentSettings)

    @field_validator("jobs")
    @classmethod
    def _one_jobs_replica(cls, value: DeploymentSettings) -> DeploymentSettings:
        if value.autoscaling is not None or value.num_replicas != 1:
            raise ValueError("jobs keeps every job's record: it runs as exactly one replica")
        return value


class ServeVideoConfig(Config):
    """Text-to-video as asynchronous jobs (a WanPipeline bundle)."""

    bundle: ModelRef = Field(default_factory=lambda: _bundle("t2v"))
    max_height: int = Field(default=720, ge=8)
    max_width: int = Field(default=1280, ge=8)
    max_num_frames: int = Field(default=81, ge=1)
    max_sequence_length: int = Field(default=512, ge=1, description="UMT5 tokens per prompt")
    max_running_jobs: int = Field(
        default=1, ge=1, description="jobs denoising at once; the rest queue"
    )
    max_jobs: int = Field(
        default=64, ge=1, description="queued + running; beyond it: 503 with Retry-After"
    )
    max_finished_jobs: int = Field(
        default=1024,
        ge=0,
        description="finished job records kept in memory (oldest dropped first); every record "
        "stays in storage, under output/video_jobs/, and is read back from there",
    )
    deployments: VideoDeployments = Field(default_factory=VideoDeployments)


class ServedModel(Config):
    """One more image model behind the same API (``models:``), picked by the request's
    ``model`` field: its own graph of text encoder, base, refiner (optional) and VAE stages;
    super-resolution and safety are the server's. A text encoder stage is shared with an
    earlier model whose bundle holds byte-identical text encoders and tokenizers."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="the API's `model` value")
    bundle: ModelRef
    refiner: ModelRef | None = None
    deployments: ModelDeployments = Field(default_factory=ModelDeployments)


class LoraServingConfig(Config):
    """Adapters a request may name (``loras`` on ``/v1/generate``): a registry folder of
    diffusers-format LoRAs, one subfolder each (``pytorch_lora_weights.safetensors``, as
    ``raygen train`` with ``adapter:`` writes it). The base denoiser holds adapter sets with
    Ray Serve's model multiplexing, so a request goes to a replica that holds its set."""

    registry: str = Field(description="folder (local or s3://) of adapters, one subfolder each")
    max_per_replica: int = Field(
        default=4, ge=1, description="adapter sets a base replica holds; the least recent goes"
    )
    max_per_request: int = Field(default=4, ge=1, description="adapters one request may combine")
    rescan_s: float = Field(
        default=10.0,
        ge=0,
        description="GET /v1/loras lists at most this stale; an unknown name rescans at once",
    )


class ServeConfig(Config):
    """`raygen serve`: the multi-stage generation graph behind one HTTP API."""

    model_name: str = Field(default="raygen", description="the API's `model` field accepts it")
    bundle: ModelRef = Field(
        default_factory=lambda: _bundle("t2i"), description="base: text encoders, DiT, VAE"
    )
    refiner: ModelRef | None = Field(
        default=None, description="SD3 bundle sharing the base's latent space; null: none"
    )
    super_resolution: list[SuperResolutionStage] = Field(
        default_factory=list, description="x4 stages a request may run, in order"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_height: int = Field(default=1024, ge=8)
    max_width: int = Field(default=1024, ge=8)
    max_images_per_request: int = Field(default=4, ge=1)
    max_sequence_length: int = Field(default=256, ge=1, description="T5 tokens per prompt")
    text_cache_size: int = Field(default=1024, ge=0, description="prompt embeddings kept (LRU)")
    request_timeout_s: float = Field(
        default=300.0, gt=0, description="beyond it: 504, and the request's remaining work stops"
    )
    retry_after_s: float = Field(default=5.0, ge=0, description="Retry-After of a 503")
    api_keys_env: str | None = Field(
        default=None,
        description="name of an environment variable holding comma-separated API keys",
    )
    output: str = Field(
        default=f"{DEFAULT_DATA_ROOT}/outputs", description="where `url` images are stored"
    )
    url_expires_s: int = Field(default=3600, ge=1, description="presigned URLs (s3:// output)")
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    deployments: ServeDeployments = Field(default_factory=ServeDeployments)
    video: ServeVideoConfig | None = Field(
        default=None, description="video jobs (/v1/videos); null: images only"
    )
    loras: LoraServingConfig | None = Field(
        default=None,
        description="adapters requests to the main model may name (registry); null: none",
    )
    models: list[ServedModel] = Field(
        default_factory=list,
        description="more image models beside the main one (model_name: bundle), each its own "
        "graph; a request's `model` picks one",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _model_names_unique(self) -> ServeConfig:
        names = [self.model_name] + [model.name for model in self.models]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"models: the name(s) {repeated} are given twice (model_name too)")
        return self

    @property
    def served_models(self) -> list[ServedModel]:
        """Every image model: the main one (``model_name``: ``bundle``, ``refiner`` and the
        ``deployments`` of its stages) first, then ``models``."""
        stages = self.deployments.model_dump(include=set(ModelDeployments.model_fields))
        main = ServedModel.model_construct(
            name=self.model_name,
            bundle=self.bundle,
            refiner=self.refiner,
            deployments=ModelDeployments.model_validate(stages),
        )
        return [main, *self.models]

    def served_model(self, name: str | None) -> ServedModel | None:
        """The model a request's ``model`` names (None: the main one); None if none is."""
        name = self.model_name if name is None else name
        return next((model for model in self.served_models if model.name == name), None)


C = TypeVar("C", bound=Config)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    # YAML scalars give `8` -> int, `true` -> bool, `null` -> None, `[a, b]` -> list.
    return key.strip().split("."), yaml.safe_load(raw) if raw else ""


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge ``update`` into ``base`` section by section, so a file that sets
    ``bundle.dtype`` keeps the default ``bundle.uri``."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            lines.append(f"{source}: '{key}': {item['msg']}")
    return "\n".join(lines)


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> C:
    """Build a ``cls`` from a YAML file, then ``values`` (CLI flags), then ``--set`` items.

    Later sources win. Every error names where the bad key came from.
    """
    data: dict[str, Any] = cls().model_dump(mode="json")
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config: {err.strerror}") from err
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of {cls.__name__} fields at the top")
        _merge(data, loaded or {})
    for key, value in (values or {}).items():
        if value is not None:
            _apply_override(data, key.split("."), value)
    for item in overrides:
        key_path, value = _parse_override(item)
        _apply_override(data, key_path, value)
    if overrides:
        source = f"{source} + --set" if path is not None else "--set"
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def dump_config(config: Config) -> str:
    """The YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
