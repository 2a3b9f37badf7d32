"""Benchmark: a GPU check ready to run on a lent machine (issue 14), in one command.

    python -m benchmarks.gpu                        # CUDA at the full sizes: <= 8 min on an H100/H200
    python -m benchmarks.gpu --device cpu --tiny    # the smoke sizes the tests run: ~35 s, 2 cores
    python -m benchmarks.gpu --parts train,serve    # some of the parts

Four parts, each in its own process (``--part NAME``) with its own time limit, so a part that
hangs or crashes costs only itself. A part writes its JSON after every measurement (a killed
part leaves what it had measured); the command gathers them into one file (``--out``; default
``results/gpu.json``, ``results/gpu-tiny.json`` with ``--tiny``):

1. parity: each serving stage in bfloat16 on the device (``actors/generation.py``'s
   PromptEncoder, Denoiser as base and as refiner, VaeDecoder, Upscaler; ``actors/safety.py``'s
   checker) against diffusers' float32 pipelines on the CPU with the same seeds, on the tiny
   bundles; and one training step of the project's objective under bf16 autocast against
   float32. It reports differences; it asserts nothing.
2. train: samples/s and model FLOPs utilisation of an SD3-medium-shaped MMDiT (random weights
   from the published config's shapes, ~2B parameters) at 1024 px: the project's rectified-flow
   objective, FSDP2 as the training loop shards (one rank), bf16 autocast, AdamW.
3. serve: images/s of the base stage and of the whole graph (text encoders -> base -> VAE
   decode) at batch 1 to 16, 1024 px, 28 steps; then 16 closed-loop clients against the base
   cutting batches as Serve's defaults do today, and taking everything queued when free.
4. prep: images/s of prep's VAE encode (``actors/encoders.py``'s LatentEncoder) at 1024 px.

``--tiny`` changes sizes only: the same functions run. Nothing here imports Ray, directly or
through the project's modules: the lent machine has none (``tests/benchmarks/test_gpu.py``
runs this with Ray unimportable).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers import StableDiffusion3Pipeline, StableDiffusionUpscalePipeline
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig
from transformers.utils import logging as transformers_logging

from actors.batches import rows_to_batch
from actors.encoders import LatentEncoder
from actors.families import Family, family_of
from actors.generation import (
    Denoiser,
    DenoiseRequest,
    PromptEmbeddings,
    PromptEncoder,
    Upscaler,
    VaeDecoder,
)
from actors.safety import ImageSafetyChecker
from flows.models import build_tiny_bundles
from flows.objectives import RectifiedFlow, shard_blocks
from schemas.api import GenerateRequest
from schemas.config import (
    EncodeConfig,
    ModelRef,
    SafetyConfig,
    ServeConfig,
    StorageConfig,
    SuperResolutionStage,
    TrainConfig,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("parity", "train", "serve", "prep")
DTYPE = torch.bfloat16  # what the stages and the training step run in on the device


@dataclass(frozen=True)
class Limit:
    budget_s: float  # what the part sizes its measurements to
    timeout_s: float  # when the command kills it


# Issue 14's plan for one GPU: <= 8 minutes in all, model building included.
LIMITS = {
    "parity": Limit(budget_s=60, timeout_s=75),
    "train": Limit(budget_s=150, timeout_s=170),
    "serve": Limit(budget_s=200, timeout_s=225),
    "prep": Limit(budget_s=45, timeout_s=60),
}

# stabilityai/stable-diffusion-3-medium-diffusers' component configs, as changes to the tiny
# t2i bundle's (the same classes; its tokenizers and scheduler stay).
SD3_MEDIUM: dict[str, dict[str, Any]] = {
    "transformer": {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "num_layers": 24,
        "attention_head_dim": 64,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048,
        "out_channels": 16,
        "pos_embed_max_size": 192,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
    },
    # CLIP ViT-L/14's text tower and OpenCLIP bigG's, with their projections.
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
    },
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
    },
    # T5-XXL's width at 2 of its 24 layers. The text-encoder stage needs a T5: without one,
    # StableDiffusion3Pipeline.encode_prompt sizes its zeros by transformer.config, and the
    # stage does not load the transformer.
    "text_encoder_3": {
        "d_model": 4096,
        "d_kv": 64,
        "num_heads": 64,
        "d_ff": 10240,
        "num_layers": 2,
    },
}
T5_NOTE = (
    "text_encoder_3 is a T5 at T5-XXL's width (4096, 64 heads, d_ff 10240) with 2 of its 24 "
    "layers: the text-encoder stage cannot run SD3 without a T5 (the pipeline sizes the zeros "
    "that stand in for one by transformer.config, which that stage does not load), so its "
    "seconds understate a real T5-XXL's"
)

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, by the name torch reports for the
# device; the first match counts (an H100 SXM reports "NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


# ---------------------------------------------------------------------------------------
# Sizes: the full run and --tiny differ only here.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParitySizes:
    height: int
    width: int
    num_inference_steps: int
    max_sequence_length: int
    upscale_from: tuple[int, int]  # (H, W) of the images the x4 stage takes
    upscale_steps: int


@dataclass(frozen=True)
class TrainSizes:
    transformer: dict[str, Any]  # changes to the tiny t2i transformer's config
    latent_size: int  # latent side: pixels / 8
    text_tokens: int  # CLIP's 77 + T5's 77 positions at full size
    batch_sizes: tuple[int, ...]  # tried in turn until one fits in memory
    warmup_steps: int
    timed_s: float  # timed steps stop after this many seconds...
    max_timed_steps: int  # ...or this many steps


@dataclass(frozen=True)
class ServeSizes:
    components: dict[str, dict[str, Any]]  # changes to the tiny t2i bundle's, per component
    height: int
    width: int
    num_inference_steps: int
    batch_sizes: tuple[int, ...]
    repeats: int  # timed calls per batch size (their median counts)
    num_clients: int  # closed-loop clients for the batching policies
    window_s: float  # per policy, at most


@dataclass(frozen=True)
class PrepSizes:
    vae: dict[str, Any]  # changes to the tiny t2i VAE's config
    size: int  # square images, px
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]  # ModelRef dtypes; prep's default is float32
    repeats: int


@dataclass(frozen=True)
class Sizes:
    parity: ParitySizes
    train: TrainSizes
    serve: ServeSizes
    prep: PrepSizes


# Parity compares numerics, not speed: the tiny bundles at both sizes.
PARITY = ParitySizes(
    height=64,
    width=96,
    num_inference_steps=8,
    max_sequence_length=16,
    upscale_from=(16, 24),
    upscale_steps=4,
)
FULL = Sizes(
    parity=PARITY,
    train=TrainSizes(
        transformer=SD3_MEDIUM["transformer"],
        latent_size=128,
        text_tokens=154,
        batch_sizes=(4, 2, 1),
        warmup_steps=2,
        timed_s=60,
        max_timed_steps=500,
    ),
    serve=ServeSizes(
        components=SD3_MEDIUM,
        height=1024,
        width=1024,
        num_inference_steps=28,
        batch_sizes=(1, 2, 4, 8, 16),
        repeats=1,
        num_clients=16,
        window_s=45,
    ),
    prep=PrepSizes(
        vae=SD3_MEDIUM["vae"],
        size=1024,
        batch_sizes=(1, 4, 8),
        dtypes=("float32", "bfloat16"),
        repeats=3,
    ),
)
TINY = Sizes(
    parity=PARITY,
    train=TrainSizes(
        transformer={},
        latent_size=16,
        text_tokens=24,
        batch_sizes=(4, 2, 1),
        warmup_steps=2,
        timed_s=1,
        max_timed_steps=3,
    ),
    serve=ServeSizes(
        components={name: {} for name in SD3_MEDIUM},
        height=64,
        width=64,
        num_inference_steps=2,
        batch_sizes=(1, 2, 4),
        repeats=2,
        num_clients=16,
        window_s=1.5,
    ),
    prep=PrepSizes(vae={}, size=64, batch_sizes=(1, 4), dtypes=("float32", "bfloat16"), repeats=2),
)


# ---------------------------------------------------------------------------------------
# A part's process: its device, clock, budget and JSON.
# ---------------------------------------------------------------------------------------


class Part:
    """One part running in its own process. Its JSON is rewritten after every measurement, so
    a part that is killed leaves what it had measured."""

    def __init__(self, name: str, device: str, budget_s: float, out: Path) -> None:
        self.name, self.out = name, out
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.deadline = time.monotonic() + budget_s
        self.result: dict[str, Any] = {"environment": environment(self.device)}
        self.save()

    def clock(self) -> float:
        """Seconds, once the device has finished the work queued on it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def remaining_s(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, message: str) -> None:
        print(f"[gpu {self.name}] {message}", flush=True)

    def record(self, key: str, value: Any, show: bool = False) -> None:
        """Keep ``value`` under ``key`` and write the JSON; ``show``: print it too."""
        self.result[key] = value
        self.save()
        if show:
            self.say(f"{key}: {json.dumps(json_safe(value, digits=4))}")

    def save(self) -> None:
        staged = self.out.with_suffix(".tmp")
        staged.write_text(json.dumps(json_safe(self.result), indent=1) + "\n")
        os.replace(staged, self.out)  # whole or not at all, if the part is killed mid-write

    def peak_memory_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": importlib.metadata.version("diffusers"),
        "transformers": importlib.metadata.version("transformers"),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def json_safe(value: Any, digits: int | None = None) -> Any:
    """``value`` as strict JSON holds it: a non-finite float becomes its name ("nan", "inf"),
    so it shows instead of breaking a reader. ``digits``: floats to that many significant
    digits (for printing)."""
    if isinstance(value, dict):
        return {str(key): json_safe(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item, digits) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, float) and digits is not None:
        return float(f"{value:.{digits}g}")
    return value


@contextmanager
def work_dir(min_free_gib: float = 1.0) -> Iterator[Path]:
    """A temporary folder for bundles, in memory (/dev/shm) when it has room: a bundle of
    gigabytes then loads without the disk."""
    shm = Path("/dev/shm")
    in_memory = shm.is_dir() and shutil.disk_usage(shm).free >= min_free_gib * 2**30
    with tempfile.TemporaryDirectory(prefix="raygen-gpu-", dir=shm if in_memory else None) as path:
        yield Path(path)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rebuild_components(
    bundle: Path, changes: dict[str, dict[str, Any]], device: torch.device, dtype: torch.dtype
) -> dict[str, int]:
    """Replace the named components of ``bundle`` with new ones of the same classes, built on
    ``device`` from their configs with ``changes`` (random weights) and saved in ``dtype``:
    a bundle of a published checkpoint's shapes, without the checkpoint. Returns the
    parameters per component."""
    index = json.loads((bundle / "model_index.json").read_text())
    num_params = {}
    for name, change in changes.items():
        library, class_name = index[name]
        cls = getattr(importlib.import_module(library), class_name)
        # Allocated and initialised on the device: seconds for billions of parameters, where
        # the CPU takes minutes.
        with torch.device(device):
            if library == "diffusers":
                model = cls.from_config({**cls.load_config(bundle / name), **change})
            else:
                config = AutoConfig.from_pretrained(bundle / name)
                config.update(change)
                model = cls(config)
        num_params[name] = sum(p.numel() for p in model.parameters())
        shutil.rmtree(bundle / name)
        model.to(device="cpu", dtype=dtype).save_pretrained(bundle / name, safe_serialization=True)
        del model
        free_memory()
    return num_params


# ---------------------------------------------------------------------------------------
# 1. parity: bf16 stages on the device against diffusers' fp32 pipelines.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float


CASES = (
    Case("a red cat sitting on a chair", None, 0, 7.0),
    Case("two dogs running on the beach at sunset", "blurry dark photo", 1, 3.5),
)
EMBEDDINGS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


def run_parity(part: Part, sizes: ParitySizes) -> None:
    """The comparison tests/actors/test_generation.py makes in float32 (where it holds to
    1e-4), with the stages in bf16 on the device: the differences bf16 makes, per stage."""
    device = part.device
    # The training step's float32 reference runs on the device: no TF32 in it.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    part.record(
        "settings",
        {
            **asdict(sizes),
            "stages": f"{str(DTYPE).removeprefix('torch.')} on {device}",
            "reference": "diffusers' float32 pipelines on the CPU (the training step: float32 "
            "on the device, TF32 off)",
        },
    )
    with work_dir() as work:
        bundles = build_tiny_bundles(work, ["t2i", "refiner", "upscaler", "nsfw"])
        pipe = reference_pipeline(StableDiffusion3Pipeline, bundles["t2i"])

        # Text encoders: the stage's embeddings against the pipeline's encode_prompt.
        encoder = PromptEncoder(bundles["t2i"], device, DTYPE)
        staged = encoder.encode(
            [case.prompt for case in CASES],
            [case.negative_prompt for case in CASES],
            sizes.max_sequence_length,
        )
        reference = [reference_embeddings(pipe, case, sizes.max_sequence_length) for case in CASES]
        part.record(
            "text_encoder",
            {
                name: tensor_diff(stacked(staged, name), stacked(reference, name))
                for name in EMBEDDINGS
            },
            show=True,
        )

        # Base: the stage from the pipeline's own embeddings, against the pipeline's latents.
        base = Denoiser(bundles["t2i"], device, DTYPE)
        latents = base.denoise(
            [denoise_request(e, case, sizes) for e, case in zip(reference, CASES, strict=True)]
        )  # [(C, h, w)]
        reference_latents = [
            pipeline_call(pipe, case, sizes, output_type="latent")[0] for case in CASES
        ]  # [(C, h, w)]
        part.record(
            "base", tensor_diff(torch.stack(latents), torch.stack(reference_latents)), show=True
        )
        # The same stage in float32 on the device: its device path is the pipeline's (on a
        # lent H200, 2.5e-6), where bf16's distance above is what eight steps of a random
        # tiny transformer at CFG 7 make of bf16 rounding (diffusers' own bf16 pipeline is as
        # far: results/gpu.json's parity_diagnosis).
        exact = Denoiser(bundles["t2i"], device, torch.float32).denoise(
            [denoise_request(e, case, sizes) for e, case in zip(reference, CASES, strict=True)]
        )
        part.record(
            "base_float32",
            tensor_diff(torch.stack(exact), torch.stack(reference_latents)),
            show=True,
        )

        # VAE decode: the stage from the pipeline's latents, against the pipeline's images.
        decoder = VaeDecoder(bundles["t2i"], device, DTYPE)
        reference_images = np.concatenate(
            [pipeline_call(pipe, case, sizes, output_type="np") for case in CASES]
        )  # (N, H, W, 3) in [0, 1]
        images = np.stack(decoder.decode(reference_latents, output_type="float32"))
        part.record("vae_decode", image_diff(images, reference_images), show=True)

        # The graph: every stage in bf16, chained as the serve graph chains them.
        chained = decoder.decode(
            base.denoise(
                [denoise_request(e, case, sizes) for e, case in zip(staged, CASES, strict=True)]
            ),
            output_type="float32",
        )
        part.record("graph", image_diff(np.stack(chained), reference_images), show=True)

        part.record(
            "refiner",
            refiner_parity(device, bundles, pipe, base, decoder, staged[1], sizes),
            show=True,
        )
        part.record("upscaler", upscaler_parity(device, bundles["upscaler"], sizes), show=True)
        part.record("safety", safety_parity(device, bundles["nsfw"], reference_images), show=True)
        part.record("train_step", train_step_parity(device, bundles["t2i"], pipe, sizes), show=True)
    part.record(
        "summary",
        {
            "graph_psnr_db": part.result["graph"]["psnr_db"],
            "refiner_psnr_db": part.result["refiner"]["psnr_db"],
            "upscaler_psnr_db": part.result["upscaler"]["psnr_db"],
            "base_latents_max_abs": part.result["base"]["max_abs"],
            "base_float32_latents_max_abs": part.result["base_float32"]["max_abs"],
            "safety_max_abs": part.result["safety"]["max_abs"],
            "train_loss_abs_diff": part.result["train_step"]["loss_abs_diff"],
            "train_grad_relative_diff": part.result["train_step"]["grad_relative_diff"],
        },
    )


def reference_pipeline(cls: type, bundle: Path) -> Any:
    """A float32 diffusers pipeline on the CPU: what the stages are tested against."""
    pipe = cls.from_pretrained(bundle)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_embeddings(
    pipe: StableDiffusion3Pipeline, case: Case, max_sequence_length: int
) -> PromptEmbeddings:
    with torch.no_grad():
        prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
            case.prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=case.negative_prompt,
            max_sequence_length=max_sequence_length,
        )  # (1, L, D), (1, L, D), (1, D_pooled), (1, D_pooled)
    return PromptEmbeddings(prompt[0], pooled[0], negative[0], negative_pooled[0])


def pipeline_call(pipe: Any, case: Case, sizes: ParitySizes, **kwargs: Any) -> Any:
    return pipe(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        num_inference_steps=sizes.num_inference_steps,
        guidance_scale=case.guidance_scale,
        height=sizes.height,
        width=sizes.width,
        generator=torch.Generator().manual_seed(case.seed),
        max_sequence_length=sizes.max_sequence_length,
        **kwargs,
    ).images


def denoise_request(
    embeddings: PromptEmbeddings, case: Case, sizes: ParitySizes, **kwargs: Any
) -> DenoiseRequest:
    return DenoiseRequest(
        embeddings=embeddings,
        seed=case.seed,
        guidance_scale=case.guidance_scale,
        height=sizes.height,
        width=sizes.width,
        num_inference_steps=sizes.num_inference_steps,
        **kwargs,
    )


def stacked(embeddings: list[PromptEmbeddings], name: str) -> torch.Tensor:
    return torch.stack([getattr(e, name) for e in embeddings])  # (N, ...)


def tensor_diff(got: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    got, reference = got.double().cpu(), reference.double().cpu()
    diff = (got - reference).abs()
    return {
        "max_abs": diff.max().item(),
        "rms": diff.square().mean().sqrt().item(),
        "reference_rms": reference.square().mean().sqrt().item(),
    }


def image_diff(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Images (N, H, W, 3) in [0, 1]: the largest difference and the PSNR (peak 1) in dB."""
    diff = got.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff**2))
    return {
        "max_abs": float(np.abs(diff).max()),
        "psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf,
    }


def refiner_parity(
    device: torch.device,
    bundles: dict[str, Path],
    pipe: StableDiffusion3Pipeline,
    base: Denoiser,
    decoder: VaeDecoder,
    embeddings: PromptEmbeddings,
    sizes: ParitySizes,
) -> dict[str, float]:
    """bf16 base -> bf16 refiner at the API's default handoff -> bf16 decode, against diffusers'
    base pipeline interrupted at SDXL's handoff step and the refiner pipeline continuing over
    the rest of the schedule (tests/actors/test_generation.py's reference)."""
    case, steps = CASES[1], sizes.num_inference_steps
    handoff_fraction = GenerateRequest(prompt=case.prompt).denoising_end
    refiner = Denoiser(bundles["refiner"], device, DTYPE)
    [handed] = base.denoise(
        [denoise_request(embeddings, case, sizes, denoising_end=handoff_fraction)]
    )
    [refined] = refiner.denoise(
        [denoise_request(embeddings, case, sizes, denoising_start=handoff_fraction, latents=handed)]
    )
    [image] = decoder.decode([refined], output_type="float32")

    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    num_train_timesteps = scheduler.config.num_train_timesteps
    cutoff = int(round(num_train_timesteps - handoff_fraction * num_train_timesteps))
    handoff = int((scheduler.timesteps >= cutoff).sum())

    def stop_at_handoff(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step + 1 == handoff:
            pipe._interrupt = True
        return callback_kwargs

    base_latents = pipeline_call(
        pipe, case, sizes, callback_on_step_end=stop_at_handoff, output_type="latent"
    )  # (1, C, h, w)
    # set_timesteps shifts the sigmas it is given: the unshifted ones of the remaining steps.
    unshifted = np.linspace(scheduler.sigma_max, scheduler.sigma_min, steps)[handoff:]
    refiner_pipe = reference_pipeline(StableDiffusion3Pipeline, bundles["refiner"])
    reference = pipeline_call(
        refiner_pipe,
        case,
        sizes,
        latents=base_latents,
        sigmas=unshifted.tolist(),
        output_type="np",
    )  # (1, H, W, 3)
    return image_diff(image[None], reference)


def upscaler_parity(device: torch.device, bundle: Path, sizes: ParitySizes) -> dict[str, float]:
    """The x4 stage in bf16 against StableDiffusionUpscalePipeline in fp32, at the stage
    config's default noise level and guidance."""
    stage = SuperResolutionStage()
    settings = {
        "noise_level": stage.noise_level,
        "num_inference_steps": sizes.upscale_steps,
        "guidance_scale": stage.guidance_scale,
    }
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*sizes.upscale_from, 3), dtype=np.uint8) for _ in CASES]
    prompts, seeds = [case.prompt for case in CASES], [case.seed for case in CASES]
    upscaled = Upscaler(bundle, device, DTYPE).upscale(
        images, prompts, seeds, **settings, output_type="float32"
    )
    pipe = reference_pipeline(StableDiffusionUpscalePipeline, bundle)
    reference = [
        pipe(
            prompt=prompt,
            image=Image.fromarray(image),
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **settings,
        ).images[0]
        for image, prompt, seed in zip(images, prompts, seeds, strict=True)
    ]  # [(4H, 4W, 3)]
    return image_diff(np.stack(upscaled), np.stack(reference))


def safety_parity(device: torch.device, bundle: Path, images: np.ndarray) -> dict[str, Any]:
    """The checker's NSFW probabilities in bf16 on the device against the same checker in
    fp32 on the CPU (its scores are the classifier's own softmax)."""
    pixels = list((images * 255).round().astype(np.uint8))  # [(H, W, 3)], as the graph sends
    threshold = SafetyConfig().max_nsfw_score
    scores = ImageSafetyChecker(bundle, threshold, device, DTYPE).scores(pixels)
    reference = ImageSafetyChecker(bundle, threshold).scores(pixels)
    return {
        "max_abs": max(abs(a - b) for a, b in zip(scores, reference, strict=True)),
        "scores": scores,
        "reference_scores": reference,
    }


@dataclass(frozen=True)
class BundlePlan:
    """What an objective reads of a run's plan (``flows.objectives.ObjectivePlan``): the
    bundle and the empty prompt's embeddings, without shards."""

    bundle_dir: str
    bundle_uri: str
    family: Family
    empty_prompt: dict[str, np.ndarray]  # "prompt_embeds" (L, D), "pooled_prompt_embeds" (D,)


def train_step_parity(
    device: torch.device, bundle: Path, pipe: StableDiffusion3Pipeline, sizes: ParitySizes
) -> dict[str, float]:
    """The project's objective (RectifiedFlow, the tiny transformer's weights) on one batch:
    loss and gradients under bf16 autocast against float32, both on the device, with the
    same noise, timesteps and dropout (the same generator seed)."""
    with torch.no_grad():
        empty, _, empty_pooled, _ = pipe.encode_prompt(
            "",
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=sizes.max_sequence_length,
        )  # (1, L, D), (1, D_pooled)
        prompts, _, pooled, _ = pipe.encode_prompt(
            [case.prompt for case in CASES],
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=sizes.max_sequence_length,
        )  # (B, L, D), (B, D_pooled)
    family = family_of(bundle)
    plan = BundlePlan(
        str(bundle),
        str(bundle),
        family,
        {"prompt_embeds": empty[0].numpy(), "pooled_prompt_embeds": empty_pooled[0].numpy()},
    )
    objective = RectifiedFlow(TrainConfig(bundle=ModelRef(uri=str(bundle))), plan, device)
    model = objective.model
    downscale = family.multiples(bundle).latent
    latent_shape = (
        len(CASES),
        family.latent_channels(model.config),
        sizes.height // downscale,
        sizes.width // downscale,
    )
    batch = {
        "latents": torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)),
        "prompt_embeds": prompts,
        "pooled_prompt_embeds": pooled,
    }
    batch = {key: value.to(device) for key, value in batch.items()}

    def step(precision: AbstractContextManager) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with precision:
            loss, _ = objective.loss(model, batch, torch.Generator(device).manual_seed(0))
        loss.backward()
        grads = torch.cat([p.grad.flatten().double() for p in model.parameters()])  # (P,)
        return loss.item(), grads

    loss_fp32, grads_fp32 = step(nullcontext())
    # What train_loop enters on a CUDA device; on any device here, so the CPU run takes the
    # path the GPU takes.
    loss_bf16, grads_bf16 = step(torch.autocast(device.type, dtype=torch.bfloat16))
    norm = grads_fp32.norm().item()
    return {
        "loss_float32": loss_fp32,
        "loss_bf16_autocast": loss_bf16,
        "loss_abs_diff": abs(loss_bf16 - loss_fp32),
        "grad_norm_float32": norm,
        "grad_norm_bf16_autocast": grads_bf16.norm().item(),
        "grad_max_abs_diff": (grads_bf16 - grads_fp32).abs().max().item(),
        "grad_relative_diff": (grads_bf16 - grads_fp32).norm().item() / norm,
        "grad_cosine": torch.nn.functional.cosine_similarity(grads_bf16, grads_fp32, dim=0).item(),
    }


# ---------------------------------------------------------------------------------------
# 2. train: samples/s and MFU of an SD3-medium-shaped MMDiT under FSDP2 and bf16 autocast.
# ---------------------------------------------------------------------------------------


def run_train(part: Part, sizes: TrainSizes) -> None:
    """Random inputs of the training shapes through the project's objective and sharding: the
    step's compute, without data loading, EMA or metric reports."""
    device = part.device
    part.record("settings", asdict(sizes))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # One rank: FSDP's all-gathers and reduce-scatters run (over one device), as the loop's
    # sharding wraps the model, but nothing crosses devices.
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
    )
    try:
        with work_dir() as work:
            bundle = build_tiny_bundles(work, ["t2i"])["t2i"]
            family = family_of(bundle)
            component = family.denoisers[0]
            transformer = {
                **family.denoiser_class(bundle).load_config(bundle, subfolder=component),
                **sizes.transformer,
            }
            text_width, pooled_width = family.text_widths(transformer)
            # `init: scratch` with the config changes: the objective builds the model.
            config = TrainConfig(
                bundle=ModelRef(uri=str(bundle)),
                init="scratch",
                transformer_config=sizes.transformer,
                parallelism="fsdp",
            )
            plan = BundlePlan(
                str(bundle),
                str(bundle),
                family,
                {
                    "prompt_embeds": np.zeros((sizes.text_tokens, text_width), np.float32),
                    "pooled_prompt_embeds": np.zeros(pooled_width, np.float32),
                },
            )
            attempts = []
            for batch_size in sizes.batch_sizes:
                try:
                    result = measure_training(part, config, plan, transformer, sizes, batch_size)
                except torch.OutOfMemoryError:
                    attempts.append({"batch_size": batch_size, "error": "out of memory"})
                    part.record("attempts", attempts)
                    part.say(f"batch {batch_size}: out of memory")
                else:
                    part.record("result", result)
                    break
                free_memory()  # out of the except block: its frames (and tensors) are gone
    finally:
        dist.destroy_process_group()
    result = part.result.get("result")
    if result is not None:
        part.record(
            "summary",
            {
                key: result[key]
                for key in ("num_params", "batch_size", "samples_per_s", "achieved_tflops", "mfu")
            },
        )


def measure_training(
    part: Part,
    config: TrainConfig,
    plan: BundlePlan,
    transformer: dict[str, Any],
    sizes: TrainSizes,
    batch_size: int,
) -> dict[str, Any]:
    device = part.device
    start = part.clock()
    torch.manual_seed(config.seed)
    with torch.device(device):
        # from_config allocates and initialises each parameter on the device.
        objective = RectifiedFlow(config, plan, device)
    built_s = part.clock() - start
    num_params = sum(p.numel() for p in objective.model.parameters())
    part.say(f"transformer of {num_params:,} params built in {built_s:.1f} s")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # train_loop's on CUDA
    flops_per_sample = counted_training_flops(
        objective, random_batch(1, sizes, transformer, plan.family, device), autocast
    )

    model = shard_blocks(objective.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay
    )
    max_norm = optim.max_grad_norm or math.inf
    batch = random_batch(batch_size, sizes, transformer, plan.family, device)
    step = 0
    for _ in range(sizes.warmup_steps):
        train_step(objective, model, params, optimizer, batch, step, max_norm, autocast)
        step += 1
    part.say(f"batch {batch_size}: {sizes.warmup_steps} warm-up steps done")

    step_times: list[float] = []
    losses: list[torch.Tensor] = []
    window_s = min(sizes.timed_s, part.remaining_s() - 10)
    timed_start = time.monotonic()
    while len(step_times) < sizes.max_timed_steps and (
        not step_times or time.monotonic() - timed_start < window_s
    ):
        begin = part.clock()
        losses.append(
            train_step(objective, model, params, optimizer, batch, step, max_norm, autocast)
        )
        step_times.append(part.clock() - begin)
        step += 1
    step_s = statistics.median(step_times)
    samples_per_s = batch_size / step_s
    achieved = flops_per_sample * samples_per_s
    peak = peak_flops(device)

    # Issue 14's formula, for comparison: 6 x params x tokens for the weights (forward 2,
    # backward 4) plus attention, 12 x layers x width x tokens^2 (QK^T and AV, 2 x T^2 x width
    # FLOPs each forward, x3 with backward). For an MMDiT it overcounts the weights: a token
    # passes only its own stream's (image or text) projections and MLPs, and the adaLN
    # modulations (a third of SD3's parameters) act once per sample, not per token. At SD3
    # medium's 1024 px shapes it is ~2.4x the counted FLOPs.
    patch = transformer["patch_size"]
    tokens = (sizes.latent_size // patch) ** 2 + sizes.text_tokens
    width = transformer["num_attention_heads"] * transformer["attention_head_dim"]
    flops_6nt = 6 * num_params * tokens + 12 * transformer["num_layers"] * width * tokens**2
    result = {
        "num_params": num_params,
        "built_s": built_s,
        "batch_size": batch_size,
        "latent_shape": [
            plan.family.latent_channels(transformer),
            sizes.latent_size,
            sizes.latent_size,
        ],
        "tokens_per_sample": tokens,
        "text_tokens": sizes.text_tokens,
        "warmup_steps": sizes.warmup_steps,
        "timed_steps": len(step_times),
        "step_s_median": step_s,
        "step_s_min": min(step_times),
        "step_s_max": max(step_times),
        "samples_per_s": samples_per_s,
        "last_loss": losses[-1].item(),
        "flops_per_sample": flops_per_sample,
        "flops_formula": (
            "3 x the forward's FLOPs as torch.utils.flop_counter.FlopCounterMode counts them at "
            "batch 1 (matmuls, convolutions, attention on SDPA's math path): backward = 2 x "
            "forward, no recomputation counted"
        ),
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else achieved / peak,
        "flops_per_sample_6nt": flops_6nt,
        "formula_6nt": (
            "6 x params x tokens + 12 x layers x width x tokens^2: an overcount for an MMDiT "
            "(each token passes one stream's weights; adaLN weights act once per sample)"
        ),
        "mfu_6nt": None if peak is None else flops_6nt * samples_per_s / peak,
        "step": (
            "zero_grad, objective.loss under bf16 autocast (fp32 parameters, as train_loop on "
            "CUDA), backward, clip_grad_norm_, AdamW; FSDP2 via flows.objectives.shard_blocks "
            "on a one-rank process group; no EMA, data loading or metric reports"
        ),
        "peak_memory_gib": part.peak_memory_gib(),
    }
    mfu = "n/a (no peak known for this device)" if peak is None else f"{achieved / peak:.1%}"
    part.say(
        f"batch {batch_size}: {samples_per_s:.2f} samples/s, {achieved / 1e12:.1f} TFLOP/s, "
        f"MFU {mfu}"
    )
    return result


def random_batch(
    batch_size: int,
    sizes: TrainSizes,
    transformer: dict[str, Any],
    family: Family,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """A batch of the shapes prep's shards give the objective, of random values."""
    text_width, pooled_width = family.text_widths(transformer)
    generator = torch.Generator(device).manual_seed(batch_size)
    side = sizes.latent_size
    shapes = {
        "latents": (batch_size, family.latent_channels(transformer), side, side),  # (B, C, h, w)
        "prompt_embeds": (batch_size, sizes.text_tokens, text_width),  # (B, L, D)
        "pooled_prompt_embeds": (batch_size, pooled_width),  # (B, D_pooled)
    }
    return {
        name: torch.randn(shape, generator=generator, device=device)
        for name, shape in shapes.items()
    }


def counted_training_flops(
    objective: RectifiedFlow, batch: dict[str, torch.Tensor], autocast: AbstractContextManager
) -> float:
    """Model FLOPs per sample of a training step on ``batch`` (of one sample): 3x the forward's.
    Attention runs on SDPA's math path for the count, whose matmuls the counter sees on every
    device (it does not know the CPU's fused kernel)."""
    generator = torch.Generator(batch["latents"].device).manual_seed(0)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), autocast, sdpa_kernel(SDPBackend.MATH), counter:
        objective.loss(objective.model, batch, generator)
    return 3.0 * counter.get_total_flops()


def train_step(
    objective: RectifiedFlow,
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    seed: int,
    max_norm: float,
    autocast: AbstractContextManager,
) -> torch.Tensor:
    """One optimizer step as train_loop takes it without accumulation, EMA or metrics."""
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator(batch["latents"].device).manual_seed(seed)
    with autocast:
        loss, _ = objective.loss(model, batch, generator)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return loss.detach()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# 3. serve: the base and the graph by batch size, then two batching policies under load.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSettings:
    """What each image request asks: the sizes, and the API's defaults for the rest."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str | None
    max_sequence_length: int

    def request(self, embeddings: PromptEmbeddings, seed: int) -> DenoiseRequest:
        return DenoiseRequest(
            embeddings=embeddings,
            seed=seed,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            num_inference_steps=self.num_inference_steps,
        )


@dataclass(frozen=True)
class Stages:
    encoder: PromptEncoder
    base: Denoiser
    decoder: VaeDecoder


class Prompts:
    """Distinct prompts and seeds, so every request misses the embedding cache, as distinct
    users' requests do; safe to share between client threads."""

    def __init__(self) -> None:
        self._next = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> tuple[list[str], list[int]]:
        with self._lock:
            numbers = list(range(self._next, self._next + count))
            self._next += count
        return [f"a red cat number {n} sitting on a chair" for n in numbers], numbers


def run_serve(part: Part, sizes: ServeSizes) -> None:
    device = part.device
    serve = ServeConfig()
    api = GenerateRequest(prompt="a prompt")  # what a request leaves to the defaults
    settings = RequestSettings(
        height=sizes.height,
        width=sizes.width,
        num_inference_steps=sizes.num_inference_steps,
        guidance_scale=api.guidance_scale,
        negative_prompt=api.negative_prompt,
        max_sequence_length=serve.max_sequence_length,
    )
    part.record("settings", asdict(settings))
    part.record(
        "method",
        [
            "in process: Ray Serve is not on the lent machine. today: a batch is cut from the "
            "first queued request plus whatever arrives within batch_wait_timeout_s, up to "
            "max_batch_size (Ray Serve's @serve.batch wait_for_batch, the Serve base "
            "deployment's defaults in schemas/config.py), also while the base runs one; cut "
            "batches run one at a time. greedy: each time the base is free it takes everything "
            "queued, up to the number of clients.",
            "sweep: per batch size, graph calls (text encoder -> base -> VAE decode, the device "
            "synchronised between stages); base_images_per_s from the base's share of the same "
            "calls; one warm-up call before, not counted",
            "each client: the text encoder (its own call, one at a time), the base through the "
            "policy, the VAE decode (its own call, one at a time); the next request when its "
            "image is decoded",
            "images_per_s: images completed after the first completion of the window, up to "
            "the last, over the seconds between those two; latencies of those same requests",
        ],
    )
    # The full bundle is ~7 GB in bf16.
    with work_dir(min_free_gib=16) as work:
        bundle = build_tiny_bundles(work, ["t2i"])["t2i"]
        start = part.clock()
        num_params = rebuild_components(bundle, sizes.components, device, DTYPE)
        built_s = part.clock() - start
        stages = Stages(
            PromptEncoder(bundle, device, DTYPE, cache_size=serve.text_cache_size),
            Denoiser(bundle, device, DTYPE),
            VaeDecoder(bundle, device, DTYPE),
        )
        loaded_s = part.clock() - start - built_s
        part.record(
            "model",
            {"num_params": num_params, "built_s": built_s, "loaded_s": loaded_s, "note": T5_NOTE},
        )
        part.say(f"bundle built in {built_s:.1f} s, stages loaded in {loaded_s:.1f} s")

        prompts = Prompts()
        graph_call(part, stages, settings, *prompts.take(1))  # warm-up, not counted
        # The budget left, less a reserve for the summary: 40% to the sweep, the rest to the
        # two policies' windows.
        spare_s = part.remaining_s() - 10
        batch_sweep(part, stages, settings, prompts, sizes, 0.4 * spare_s)
        window_s = min(sizes.window_s, (part.remaining_s() - 10) / 2)
        base = serve.deployments.base
        policies = (
            Policy("today", base.max_batch_size, base.batch_wait_timeout_s),
            Policy("greedy", sizes.num_clients, None),
        )
        loads = {}
        for policy in policies:
            loads[policy.name] = closed_loop(
                part, stages, settings, prompts, policy, sizes.num_clients, window_s
            )
            part.record("policies", loads)
            part.say(f"{policy.name}: {json.dumps(json_safe(loads[policy.name], digits=4))}")
    today, greedy = loads["today"]["images_per_s"], loads["greedy"]["images_per_s"]
    ratio = greedy / today if today and greedy else None
    part.record(
        "summary",
        {
            "base_images_per_s": {
                row["batch_size"]: row.get("base_images_per_s") for row in part.result["sweep"]
            },
            "graph_images_per_s": {
                row["batch_size"]: row.get("graph_images_per_s") for row in part.result["sweep"]
            },
            "today_images_per_s": today,
            "greedy_images_per_s": greedy,
            "greedy_over_today": ratio,
        },
    )


def graph_call(
    part: Part, stages: Stages, settings: RequestSettings, prompts: list[str], seeds: list[int]
) -> dict[str, float]:
    """One batch through the graph, chained as the serve graph chains the stages (embeddings
    to the base, its latents to the decoder): each stage's seconds."""
    start = part.clock()
    embeddings = stages.encoder.encode(
        prompts, [settings.negative_prompt] * len(prompts), settings.max_sequence_length
    )
    encoded = part.clock()
    latents = stages.base.denoise(
        [settings.request(e, seed) for e, seed in zip(embeddings, seeds, strict=True)]
    )  # [(C, h, w)]
    denoised = part.clock()
    stages.decoder.decode(latents)  # [(H, W, 3)] uint8
    decoded = part.clock()
    return {
        "text_encoder_s": encoded - start,
        "base_s": denoised - encoded,
        "vae_decode_s": decoded - denoised,
        "graph_s": decoded - start,
    }


def batch_sweep(
    part: Part,
    stages: Stages,
    settings: RequestSettings,
    prompts: Prompts,
    sizes: ServeSizes,
    budget_s: float,
) -> None:
    """Images/s of the base stage and of the whole graph per batch size, from the same calls
    (the base's seconds are its share of each graph call). A batch size whose calls would
    overrun ``budget_s`` (judged by the last one's seconds per image) is skipped."""
    rows: list[dict[str, Any]] = []
    end = time.monotonic() + budget_s
    seconds_per_image = None
    for batch_size in sizes.batch_sizes:
        expected_s = None if seconds_per_image is None else seconds_per_image * batch_size
        if expected_s is not None and time.monotonic() + expected_s * sizes.repeats > end:
            rows.append({"batch_size": batch_size, "skipped": "over the part's time budget"})
            part.record("sweep", rows)
            part.say(f"batch {batch_size}: skipped, ~{expected_s:.0f} s a call is over budget")
            continue
        try:
            calls = [
                graph_call(part, stages, settings, *prompts.take(batch_size))
                for _ in range(sizes.repeats)
            ]
        except torch.OutOfMemoryError:
            rows.append({"batch_size": batch_size, "error": "out of memory"})
            part.record("sweep", rows)
            part.say(f"batch {batch_size}: out of memory")
            break
        seconds = {key: statistics.median(call[key] for call in calls) for key in calls[0]}
        seconds_per_image = seconds["graph_s"] / batch_size
        rows.append(
            {
                "batch_size": batch_size,
                "repeats": sizes.repeats,
                **seconds,
                "base_images_per_s": batch_size / seconds["base_s"],
                "graph_images_per_s": batch_size / seconds["graph_s"],
                "peak_memory_gib": part.peak_memory_gib(),
            }
        )
        part.record("sweep", rows)
        part.say(
            f"batch {batch_size}: base {rows[-1]['base_images_per_s']:.3f} images/s, graph "
            f"{rows[-1]['graph_images_per_s']:.3f} images/s"
        )


@dataclass(frozen=True)
class Policy:
    """How the base cuts batches from its queue."""

    name: str
    max_batch_size: int
    batch_wait_timeout_s: float | None  # None: whatever is queued when the base is free


Pending = tuple[DenoiseRequest, Future]


class BatchingBase:
    """The base stage behind a batching policy, in process: requests queue, and one thread
    runs one batch at a time.

    With a wait (today's policy), a second thread cuts batches as Ray Serve's ``@serve.batch``
    does (``wait_for_batch`` in ray/serve/batching.py): the first queued request, then what
    arrives within the wait, up to the maximum; cut batches queue for the base in turn
    (``max_concurrent_batches`` 1), and cutting goes on while one runs. Without a wait
    (greedy), the base itself takes everything queued, up to the maximum, when it is free.
    Once ``stop`` is set the running batch stops after its current step.
    """

    def __init__(
        self, part: Part, denoiser: Denoiser, policy: Policy, stop: threading.Event
    ) -> None:
        self.part, self.denoiser, self.policy, self.stop = part, denoiser, policy, stop
        self.requests: queue.Queue[Pending] = queue.Queue()
        self.batches: queue.Queue[list[Pending]] = queue.Queue()
        self.runs: list[tuple[float, float, int]] = []  # (start, end, size) per batch run
        self.threads = [threading.Thread(target=self._run, daemon=True)]
        if policy.batch_wait_timeout_s is not None:
            self.threads.append(threading.Thread(target=self._cut, daemon=True))
        for thread in self.threads:
            thread.start()

    def submit(self, request: DenoiseRequest) -> Future:
        future: Future = Future()
        self.requests.put((request, future))
        return future

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def _next(self, source: queue.Queue) -> Any:
        """The next item of ``source``, or None once stopped."""
        while not self.stop.is_set():
            try:
                return source.get(timeout=0.05)
            except queue.Empty:
                pass
        return None

    def _cut(self) -> None:
        assert self.policy.batch_wait_timeout_s is not None
        while (first := self._next(self.requests)) is not None:
            batch = [first]
            deadline = time.monotonic() + self.policy.batch_wait_timeout_s
            while len(batch) < self.policy.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    # Past the wait, the requests already queued still join.
                    pending = (
                        self.requests.get(timeout=left) if left > 0 else self.requests.get_nowait()
                    )
                except queue.Empty:
                    break
                batch.append(pending)
            self.batches.put(batch)

    def _next_batch(self) -> list[Pending] | None:
        if self.policy.batch_wait_timeout_s is not None:
            return self._next(self.batches)
        first = self._next(self.requests)
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.policy.max_batch_size:
            try:
                batch.append(self.requests.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = self.part.clock()
            try:
                latents = self.denoiser.denoise(
                    [request for request, _ in batch],
                    callback_on_step_end=lambda done, num_steps: self.stop.is_set(),
                )
            except Exception as err:  # to the clients, who raise it
                for _, future in batch:
                    future.set_exception(err)
                continue
            self.runs.append((start, self.part.clock(), len(batch)))
            for (_, future), sample in zip(batch, latents, strict=True):
                future.set_result(sample)


def closed_loop(
    part: Part,
    stages: Stages,
    settings: RequestSettings,
    prompts: Prompts,
    policy: Policy,
    num_clients: int,
    window_s: float,
) -> dict[str, Any]:
    """``num_clients`` threads, each sending its next request when its image is decoded, for
    ``window_s``; the base cuts batches by ``policy``."""
    stop = threading.Event()
    base = BatchingBase(part, stages.base, policy, stop)
    encode_lock, decode_lock = threading.Lock(), threading.Lock()
    completed: list[tuple[float, float]] = []  # (start, end) per request
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while not stop.is_set():
                [prompt], [seed] = prompts.take(1)
                start = time.perf_counter()
                with encode_lock:
                    [embeddings] = stages.encoder.encode(
                        [prompt], [settings.negative_prompt], settings.max_sequence_length
                    )
                latents = result_unless_stopped(
                    base.submit(settings.request(embeddings, seed)), stop
                )
                if latents is None:
                    return
                with decode_lock:
                    stages.decoder.decode([latents])  # returns host arrays: the device is done
                completed.append((start, time.perf_counter()))
        except BaseException as err:  # raised in the caller's thread below
            errors.append(err)
            stop.set()

    clients = [threading.Thread(target=client, daemon=True) for _ in range(num_clients)]
    opened = time.perf_counter()
    for thread in clients:
        thread.start()
    stop.wait(window_s)
    closed = time.perf_counter()
    stop.set()
    for thread in clients:
        thread.join()
    base.join()
    if errors:
        raise errors[0]
    return load_stats(completed, base.runs, opened, closed, policy, window_s)


def result_unless_stopped(future: Future, stop: threading.Event) -> torch.Tensor | None:
    while True:
        try:
            return future.result(timeout=0.05)
        except FutureTimeout:
            if stop.is_set():
                return None


def load_stats(
    completed: list[tuple[float, float]],
    runs: list[tuple[float, float, int]],
    opened: float,
    closed: float,
    policy: Policy,
    window_s: float,
) -> dict[str, Any]:
    """Throughput from the first completion to the last (the start-up before the first image
    left out), latencies of the same requests, and the base's batches."""
    in_window = sorted((start, end) for start, end in completed if end <= closed)
    stats: dict[str, Any] = {
        **asdict(policy),
        "window_s": window_s,
        "completed": len(in_window),
        "base_batch_sizes": dict(sorted(Counter(size for _, _, size in runs).items())),
        "base_busy_fraction": sum(min(end, closed) - start for start, end, _ in runs)
        / (closed - opened),
        "images_per_s": None,
    }
    if not in_window:
        return stats
    first = min(end for _, end in in_window)
    counted = [(start, end) for start, end in in_window if end > first]
    if not counted:
        return stats
    last = max(end for _, end in counted)
    latencies = [end - start for start, end in counted]
    p50, p95 = np.percentile(latencies, [50, 95])
    stats.update(
        images_per_s=len(counted) / (last - first),
        counted=len(counted),
        counted_from_s=first - opened,
        counted_to_s=last - opened,
        latency_p50_s=float(p50),
        latency_p95_s=float(p95),
    )
    return stats


# ---------------------------------------------------------------------------------------
# 4. prep: prep's VAE encode.
# ---------------------------------------------------------------------------------------


def run_prep(part: Part, sizes: PrepSizes) -> None:
    """Images/s of ``LatentEncoder`` (the class prep's encode stage runs) on batches of decoded
    rows, per dtype and batch size."""
    device = part.device
    part.record(
        "settings",
        {
            **asdict(sizes),
            "method": "LatentEncoder called on a batch of decoded rows ((1, H, W, 3) uint8 "
            "pixels, as decode hands them on), after one warm-up call: the pipeline's "
            "preprocessing, the VAE's encode and the latents' copy to the host",
        },
    )
    rows = []
    with work_dir() as work:
        bundle = build_tiny_bundles(work, ["t2i"])["t2i"]
        # Saved in float32, so each dtype loads its own cast of the same weights.
        num_params = rebuild_components(bundle, {"vae": sizes.vae}, device, torch.float32)
        part.record("model", {"num_params": num_params})
        rng = np.random.default_rng(0)
        decoded = [
            {
                "sample_id": f"image-{index}",
                "media_kind": "image",
                "status": "ok",
                "pixels": rng.integers(0, 256, (1, sizes.size, sizes.size, 3), dtype=np.uint8),
            }
            for index in range(max(sizes.batch_sizes))
        ]  # as decode hands images over: (1, H, W, 3) uint8
        for dtype in sizes.dtypes:
            model = ModelRef(uri=str(bundle), device=str(device), dtype=dtype)
            encoder = LatentEncoder(EncodeConfig(), model, None, StorageConfig())
            for batch_size in sizes.batch_sizes:
                if part.remaining_s() < 5:
                    rows.append({"dtype": dtype, "batch_size": batch_size, "skipped": "budget"})
                    continue
                batch = rows_to_batch(decoded[:batch_size])
                try:
                    encoder(batch)  # warm-up, not counted
                    seconds = []
                    for _ in range(sizes.repeats):
                        start = part.clock()
                        encoder(batch)
                        seconds.append(part.clock() - start)
                except torch.OutOfMemoryError:
                    rows.append(
                        {"dtype": dtype, "batch_size": batch_size, "error": "out of memory"}
                    )
                    part.record("encode", rows)
                    break
                median = statistics.median(seconds)
                rows.append(
                    {
                        "dtype": dtype,
                        "batch_size": batch_size,
                        "seconds": median,
                        "images_per_s": batch_size / median,
                        "peak_memory_gib": part.peak_memory_gib(),
                    }
                )
                part.record("encode", rows)
                part.say(f"{dtype} batch {batch_size}: {batch_size / median:.2f} images/s")
            del encoder
            free_memory()
    part.record(
        "summary",
        {
            f"{row['dtype']}_batch_{row['batch_size']}_images_per_s": row.get("images_per_s")
            for row in rows
        },
    )


# ---------------------------------------------------------------------------------------
# The command: each part in its own process, with its own time limit.
# ---------------------------------------------------------------------------------------


def run_part(name: str, device: str, sizes: Sizes, budget_s: float, out: Path) -> None:
    # Loading bars would fill the stderr whose last lines explain a failed part.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    part = Part(name, device, budget_s, out)
    runners = {
        "parity": lambda: run_parity(part, sizes.parity),
        "train": lambda: run_train(part, sizes.train),
        "serve": lambda: run_serve(part, sizes.serve),
        "prep": lambda: run_prep(part, sizes.prep),
    }
    runners[name]()


def part_process(name: str, device: str, tiny: bool, limit: Limit, folder: Path) -> dict[str, Any]:
    """Run one part as ``python -m benchmarks.gpu --part NAME``: its status, seconds and JSON
    (what it had written if it timed out or failed, and the end of its stderr)."""
    out, stderr_path = folder / f"{name}.json", folder / f"{name}.stderr"
    command = [
        sys.executable, "-m", "benchmarks.gpu", "--part", name, "--device", device,
        "--budget-s", str(limit.budget_s), "--out", str(out), *(["--tiny"] if tiny else []),
    ]  # fmt: skip
    start = time.perf_counter()
    with stderr_path.open("w") as stderr:
        try:
            returncode = subprocess.run(
                command,
                cwd=REPO,
                stderr=stderr,  # stdout is ours: its progress lines show as they come
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                timeout=limit.timeout_s,
            ).returncode
            status = "ok" if returncode == 0 else "error"
        except subprocess.TimeoutExpired:  # killed by subprocess.run
            status = "timeout"
    record: dict[str, Any] = {
        "status": status,
        "wall_s": time.perf_counter() - start,
        **asdict(limit),
    }
    if out.exists():
        record["result"] = json.loads(out.read_text())
    if status != "ok":
        record["error"] = "\n".join(stderr_path.read_text().splitlines()[-30:])
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is one")
    parser.add_argument("--tiny", action="store_true", help="the smoke sizes (tiny bundles)")
    parser.add_argument("--out", type=Path, help="default: results/gpu.json (gpu-tiny.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, in order")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a part's process
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [name.strip() for name in args.parts.split(",") if name.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; known: {list(PARTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else FULL
    if args.part is not None:
        run_part(args.part, device, sizes, args.budget_s, args.out)
        return {}

    out = args.out or RESULTS / ("gpu-tiny.json" if args.tiny else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "command": "python -m benchmarks.gpu "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "tiny": args.tiny,
        "dtype": str(DTYPE).removeprefix("torch."),
        "sizes": asdict(sizes),
        "parts": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raygen-gpu-parts-") as folder:
        for name in args.parts:
            print(f"[gpu] {name}: starting (budget {LIMITS[name].budget_s:.0f} s)", flush=True)
            record = part_process(name, device, args.tiny, LIMITS[name], Path(folder))
            report["parts"][name] = record
            environment = record.get("result", {}).get("environment")
            if environment is not None:
                report.setdefault("environment", environment)
            report["summary"] = {
                part: {"status": record["status"], **record.get("result", {}).get("summary", {})}
                for part, record in report["parts"].items()
            }
            report["wall_s"] = time.perf_counter() - start
            out.write_text(json.dumps(json_safe(report), indent=1) + "\n")
            print(f"[gpu] {name}: {record['status']} in {record['wall_s']:.1f} s", flush=True)
            if record["status"] != "ok":
                print(record["error"], flush=True)
    print(json.dumps(json_safe(report["summary"]), indent=1), flush=True)
    print(f"[gpu] {report['wall_s']:.0f} s; JSON: {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
