"""`raygen vae`: a bundle's autoencoder (AutoencoderKL) trained on the pixels of a corpus.

A model family starts with its VAE, and teams fine-tune VAEs on their domain. This is the
training loop of flows/train.py (Ray Train, DDP, EMA, checkpoints, resume, restarts, metrics)
with another plan and objective:

- ``PixelPlan``: the corpus is listed like prep's input and decoded by prep's own stages
  (FetchMedia -> MediaDecoder, as Ray Data tasks) into square images of ``resolution``
  pixels, streamed to the workers (a small corpus is decoded once and held in Ray's object
  store instead of decoded every epoch);
- ``AutoencoderTraining``: reconstruction (MSE) + ``kl_weight`` x KL of the posterior, the
  objective of the KL autoencoders of latent diffusion (Rombach et al. 2022) without their
  perceptual and adversarial terms;
- the bundle: the source bundle with the trained VAE, whose ``scaling_factor`` and
  ``shift_factor`` are measured on the corpus (the family's normalisation, fitted to the
  new latents as SD3's were), so prep and every pipeline normalise its latents right.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from diffusers import AutoencoderKL
from PIL import Image

from actors.decode import MediaDecoder, decoded_images
from actors.families import Family, component_config, family_of
from actors.sources import FetchMedia, list_inputs
from cluster.bundles import resolve_bundle
from cluster.storage import Storage, join
from flows.objectives import StatelessObjective
from flows.prep import map_tasks
from flows.train import RunResult, TrainingError, run_loop
from flows.train_log import png_bytes
from schemas.config import AutoencoderConfig, BucketConfig, ConfigError, LoopConfig, PrepConfig

PIXELS = "pixels"  # the dataset's one column: (R, R, 3) uint8 images (decoded_images)


def _prep_view(config: AutoencoderConfig, step: int) -> PrepConfig:
    """The corpus as prep's stages see it: the same input listing and decode settings, one
    square bucket of ``resolution`` pixels (images are resized and centre-cropped to it)."""
    return PrepConfig(
        input=config.data,
        decode=config.decode,
        buckets=BucketConfig(resolution=config.resolution, step=step, max_aspect=1.0),
        storage=config.storage,
    )


def _decode_in_process(prep: PrepConfig, items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    fetched = FetchMedia(prep.decode, prep.storage)(batch)
    return MediaDecoder(prep.decode, prep.buckets)(fetched)


class PixelStream:
    """One worker's batches of decoded images, epoch after epoch, with the (epoch, position)
    a checkpoint records. Ray Train splits the dataset with equal shares, so every worker's
    epoch ends on the same batch."""

    def __init__(self, shard: Any, batch_size: int, seed: int, shuffle_buffer: int) -> None:
        self.shard, self.batch_size = shard, batch_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.epoch, self.position = 0, 0
        self._batches: Any = None

    def _open(self) -> Any:
        return iter(
            self.shard.iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                local_shuffle_seed=self.seed * 1_000_003 + self.epoch,
            )
        )

    def __iter__(self) -> PixelStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            self._batches = self._open()
        batch = next(self._batches, None)
        if batch is None:
            if self.position == 0:
                raise TrainingError(
                    f"data: an epoch gave no batch of {self.batch_size} images per worker"
                )
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        return batch

    def seek(self, epoch: int, position: int) -> None:
        """Continue where a checkpoint left off: its epoch, the batches it consumed skipped."""
        self.epoch, self.position, self._batches = epoch, 0, None
        for _ in range(position):
            next(self)


@dataclass
class PixelPlan:
    """What a worker needs: the bundle, the batch, fixed images for the grid and statistics.
    The driver keeps the corpus listing (``items``), which does not travel to workers."""

    bundle_uri: str
    bundle_dir: str
    pipeline_class: str
    resolution: int
    batch_per_worker: int
    held: bool  # decoded once and held in Ray's object store
    samples: dict[str, np.ndarray]  # PIXELS: (N, R, R, 3) uint8, the first decodable inputs
    prep: PrepConfig  # the corpus as prep's stages read it
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)
    media: str = "image"
    prior: None = None  # no second stream (train's DreamBooth prior preservation)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "items": []}

    @property
    def family(self) -> Family:
        return family_of({"_class_name": self.pipeline_class})

    def describe(self) -> str:
        kept = "held in memory" if self.held else "streamed"
        return (
            f"image AutoencoderKL on {len(self.items)} inputs at {self.resolution}x"
            f"{self.resolution} ({kept})"
        )

    @property
    def streams_data(self) -> bool:
        return True

    def datasets(self, storage: Storage) -> dict[str, ray.data.Dataset]:
        config = self.prep
        ds = ray.data.from_items(self.items)
        ds = map_tasks(
            ds,
            FetchMedia,
            "fetch",
            config.decode.resources,
            config=config.decode,
            storage=config.storage,
        )
        ds = map_tasks(
            ds,
            MediaDecoder,
            "decode",
            config.decode.resources,
            config=config.decode,
            bucket_config=config.buckets,
        )
        ds = ds.map_batches(decoded_images, batch_format="numpy", num_cpus=0.25)
        return {PIXELS: ds.materialize() if self.held else ds}

    def open_stream(self, config: LoopConfig, rank: int, num_workers: int) -> PixelStream:
        shard = ray.train.get_dataset_shard(PIXELS)
        return PixelStream(shard, self.batch_per_worker, config.seed, config.shuffle_buffer)

    def model_inputs(
        self,
        arrays: dict[str, np.ndarray],
        config: LoopConfig,
        generator: torch.Generator,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        return {PIXELS: to_model_pixels(arrays[PIXELS], device)}

    def sample_grid(
        self,
        objective: AutoencoderTraining,
        weights: dict[str, torch.Tensor],
        config: LoopConfig,
        device: torch.device,
    ) -> bytes:
        return objective.reconstruction_grid(weights, self.samples[PIXELS][: config.num_samples])

    def prompt_following(
        self, objective: Any, weights: dict[str, torch.Tensor], config: LoopConfig, device: Any
    ) -> dict[str, float]:
        raise ConfigError("eval_every: an autoencoder follows no prompts")  # plan_pixels checks


def to_model_pixels(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], what the VAE takes."""
    x = torch.as_tensor(pixels, device=device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_image_pixels(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def plan_pixels(config: AutoencoderConfig, storage: Storage) -> PixelPlan:
    """Every mistake the driver can see before a worker starts, naming the field."""
    storage.check(config.output)
    bundle_dir = resolve_bundle(config.bundle.uri, storage)
    family = family_of(config.bundle.uri, storage)
    vae_class = component_config(bundle_dir, family.vae).get("_class_name", "AutoencoderKL")
    if family.media != "image" or vae_class != "AutoencoderKL":
        raise ConfigError(
            f"bundle: {config.bundle.uri} has a {vae_class} ({family.name}); `raygen vae` "
            f"trains image autoencoders (AutoencoderKL)"
        )
    if config.init == "bundle" and config.vae_config:
        raise ConfigError("vae_config: only used with init: scratch")
    if config.eval_every:
        raise ConfigError(
            "eval_every: an autoencoder follows no prompts; its samples are "
            "reconstructions (sample_every)"
        )
    if config.parallelism != "ddp":
        raise ConfigError("parallelism: the autoencoder trains with ddp (it fits a device)")
    step = family.multiples(bundle_dir, storage).latent
    if config.resolution % step:
        raise ConfigError(
            f"resolution: {config.resolution} is not a multiple of the VAE's downscale {step}"
        )
    world = config.num_workers * config.gradient_accumulation_steps
    if config.batch_size % world:
        raise ConfigError(
            f"batch_size: {config.batch_size} must be a multiple of num_workers x "
            f"gradient_accumulation_steps = {config.num_workers} x "
            f"{config.gradient_accumulation_steps}"
        )
    prep = _prep_view(config, step)
    items = list_inputs(prep, storage)  # an empty corpus is an error naming config.data

    # Fixed images: the sample grid's originals, and the latents that set the VAE's factors.
    decoded = _decode_in_process(prep, items[: config.statistics_rows])
    samples = decoded_images(decoded)[PIXELS]
    if len(samples) == 0:
        reasons = sorted({str(r) for r in decoded["reason"] if r}) or ["no images"]
        raise ConfigError(
            f"data: none of the first {len(decoded['status'])} inputs of {config.data} is an "
            f"image prep decodes ({', '.join(reasons)})"
        )
    return PixelPlan(
        bundle_uri=config.bundle.uri,
        bundle_dir=str(bundle_dir.resolve()),
        pipeline_class=family.class_name,
        resolution=config.resolution,
        batch_per_worker=config.batch_size // world,
        held=len(items) * config.resolution**2 * 3 <= config.in_memory_bucket_bytes,
        samples={PIXELS: samples},
        prep=prep,
        items=items,
    )


class VAEWithPosterior(torch.nn.Module):
    """An AutoencoderKL whose ``forward`` returns the reconstruction and the posterior's KL:
    DDP synchronises gradients through ``forward`` only, and AutoencoderKL's own forward
    returns no KL."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator)  # (B, C, h, w)
        return self.vae.decode(latents).sample, posterior.kl()  # (B, 3, H, W), (B,)

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()


def vae_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapper's state dict -> the AutoencoderKL's."""
    return {key.removeprefix("vae."): value for key, value in state_dict.items()}


class AutoencoderTraining(StatelessObjective):
    """The objective: reconstruction MSE + ``kl_weight`` x the posterior's KL (summed over
    latent elements, as diffusers' ``DiagonalGaussianDistribution.kl`` gives it)."""

    def __init__(self, config: AutoencoderConfig, plan: PixelPlan, device: torch.device) -> None:
        if config.init == "scratch":
            vae_config = AutoencoderKL.load_config(plan.bundle_dir, subfolder="vae")
            vae = AutoencoderKL.from_config({**vae_config, **config.vae_config})
        else:
            vae = AutoencoderKL.from_pretrained(plan.bundle_dir, subfolder="vae")
        self.model = VAEWithPosterior(vae).to(device).train()
        self.config, self.plan, self.device = config, plan, device

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        pixels = batch[PIXELS]  # (B, 3, H, W) in [-1, 1]
        reconstruction, kl = model(pixels, generator)
        mse = torch.nn.functional.mse_loss(reconstruction.float(), pixels.float())
        loss = mse + self.config.kl_weight * kl.mean()
        return loss, {"reconstruction_mse": mse.item(), "kl": kl.mean().item()}

    def _vae(self, state_dict: dict[str, torch.Tensor]) -> AutoencoderKL:
        vae = AutoencoderKL.from_config(self.model.vae.config)
        vae.load_state_dict(vae_weights(state_dict))
        return vae.eval()

    @torch.no_grad()
    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        """The source bundle with this VAE, its latent factors measured on the corpus."""
        vae = self._vae(state_dict)
        pixels = to_model_pixels(self.plan.samples[PIXELS], torch.device("cpu"))
        latents = vae.encode(pixels).latent_dist.mean  # (N, C, h, w)
        vae.register_to_config(**self.plan.family.fit_latent_factors(latents, vae.config))
        out = Path(out_dir)
        shutil.copytree(
            self.plan.bundle_dir, out, ignore=shutil.ignore_patterns("vae"), dirs_exist_ok=True
        )
        vae.save_pretrained(out / "vae", safe_serialization=True)

    @torch.no_grad()
    def reconstruction_grid(self, weights: dict[str, torch.Tensor], pixels: np.ndarray) -> bytes:
        """PNG: the fixed images (top row) and their reconstructions (bottom row)."""
        vae = self._vae(weights)
        x = to_model_pixels(pixels, torch.device("cpu"))
        rebuilt = to_image_pixels(vae.decode(vae.encode(x).latent_dist.mode()).sample)
        n, height, width, _ = pixels.shape
        grid = Image.new("RGB", (n * width, 2 * height))
        for index in range(n):
            grid.paste(Image.fromarray(pixels[index]), (index * width, 0))
            grid.paste(Image.fromarray(rebuilt[index]), (index * width, height))
        return png_bytes(grid)


def run_autoencoder(config: AutoencoderConfig) -> RunResult:
    """`raygen vae`: the training loop of flows/train.py with ``AutoencoderTraining``."""
    storage = Storage(config.storage)
    plan = plan_pixels(config, storage)
    result = run_loop(config, plan, AutoencoderTraining, "vae")
    vae = json.loads(storage.read_bytes(join(result.bundle, "vae", "config.json")))
    factors = ", ".join(
        f"{key} {vae[key]:.4g}" for key in ("scaling_factor", "shift_factor") if vae.get(key)
    )
    print(
        f"[raygen vae] {result.steps} steps; bundle with the trained VAE ({factors}): "
        f"{result.bundle}",
        flush=True,
    )
    return result
