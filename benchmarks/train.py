"""Benchmark: `raygen train` on Ray Train against a plain single-process PyTorch loop.

Both train the same SD3 MMDiT (the tiny t2i bundle's components around a wider, deeper
``SD3Transformer2DModel``, built here from a config with seeded weights; its parameter count
goes into the JSON) with the same objective (``RectifiedFlow``: the same noise, timesteps and
loss code), the same global batch, AdamW, clipping and EMA. The loop holds the data in memory
as tensors; `raygen train` streams the same rows from parquet shards through Ray Data. The
shards are written here in prep's schema with seeded random latents and embeddings: this
measures the training machinery, not the data.

    python -m benchmarks.train            # about 6 minutes on 2 cores
    python -m benchmarks.train --quick    # smoke run, about 2 minutes

Reported (printed, and as JSON at ``--out``), all from one run:

- steps/s of the loop (torch on all cores, its default) and of `raygen train` with one
  worker (reserving all cores, so torch gets the same threads), as medians after warm-up of
  the time from one step's end to the next (so metric reports and checkpoints count); the Ray Train overhead (1 - ratio; target at most 10%) and the
  worker's fraction of step time spent waiting for data (target below 5%);
- `raygen train` with two workers (one thread each, the same global batch) against one;
- wall time of each `raygen train` run, start-up included, for scale;
- distillation: the MSE to the teacher's 32-step samples of the student at 1, 2 and 4 steps
  and of the teacher at 4 steps (target: the student at 4 steps at least 2x closer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from safetensors.numpy import save_file

from cluster.storage import Storage
from flows.distill import distance_to_teacher, run_distill
from flows.models import CAPTION_WORDS, build_tiny_bundles
from flows.objectives import RectifiedFlow
from flows.shard_reader import embeddings_and_latents
from flows.train import (
    _to_model_inputs,
    plan_run,
    run_train,
    warmup_cosine,
)
from schemas.config import DistillConfig, TrainConfig, load_config
from schemas.shards import BucketKey, Manifest, shard_schema

WARMUP_STEPS = 3


def build_bundle(out: Path, tiny: Path, layers: int, heads: int, seed: int) -> tuple[Path, int]:
    """The tiny t2i bundle with a bigger transformer: denoising dominates a step."""
    bundle = out / "bench-t2i"
    shutil.copytree(tiny, bundle, ignore=shutil.ignore_patterns("transformer"))
    config = dict(SD3Transformer2DModel.load_config(tiny, subfolder="transformer"))
    config.update(num_layers=layers, num_attention_heads=heads, caption_projection_dim=32 * heads)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel.from_config({**config, "attention_head_dim": 32})
    model.save_pretrained(bundle / "transformer", safe_serialization=True)
    return bundle, sum(p.numel() for p in model.parameters())


def write_shards(
    out: Path,
    bundle: Path,
    latents: np.ndarray,
    prompt_embeds: np.ndarray,
    pooled_prompt_embeds: np.ndarray,
    empty: tuple[np.ndarray, np.ndarray],
) -> Path:
    """One bucket of prep-schema shards: latents (N, C, h, w) stored unscaled (as prep stores
    them: the VAE factors are undone here), embeddings (N, L, D) and (N, D), and the empty
    prompt's embeddings for classifier-free guidance."""
    vae = json.loads((bundle / "vae" / "config.json").read_text())
    latents = latents / vae["scaling_factor"] + vae["shift_factor"]
    num_rows, latent_shape = len(latents), latents.shape[1:]
    schema = shard_schema(latent_shape, prompt_embeds.shape[1:], pooled_prompt_embeds.shape[1:])
    pixels = latent_shape[-1] * 2 ** (len(vae["block_out_channels"]) - 1)
    bucket = str(BucketKey(height=pixels, width=pixels))
    folder = out / "shards" / bucket
    folder.mkdir(parents=True)

    def tensor(values: np.ndarray) -> pa.Array:
        return pa.FixedShapeTensorArray.from_numpy_ndarray(values.astype(np.float32))

    columns: dict[str, Any] = {
        "sample_id": [f"s{i:06d}" for i in range(num_rows)],
        "source_uri": [f"synthetic://{i}" for i in range(num_rows)],
        "media_kind": ["image"] * num_rows,
        "original_height": [pixels] * num_rows,
        "original_width": [pixels] * num_rows,
        "crop_box": [[0, 0, pixels, pixels]] * num_rows,
        "bucket": [bucket] * num_rows,
        "caption_original": ["synthetic"] * num_rows,
        "caption_synthetic": [None] * num_rows,
        "latent_mean": tensor(latents),
        "prompt_embeds_original": tensor(prompt_embeds),
        "pooled_prompt_embeds_original": tensor(pooled_prompt_embeds),
    }
    table = pa.table(
        {
            f.name: columns[f.name] if f.name in columns else pa.nulls(num_rows, f.type)
            for f in schema
        },
        schema=schema,
    )
    pq.write_table(table, folder / "part-0.parquet")
    save_file(
        {"image_prompt_embeds": empty[0], "image_pooled_prompt_embeds": empty[1]},
        out / "empty_prompt.safetensors",
    )
    manifest = Manifest(
        bundle_uri=str(bundle),
        config={},
        num_inputs=num_rows,
        num_written=num_rows,
        shards=[f"shards/{bucket}/part-0.parquet"],
        buckets={bucket: num_rows},
        vae={
            "image": {"scaling_factor": vae["scaling_factor"], "shift_factor": vae["shift_factor"]}
        },
        empty_prompt="empty_prompt.safetensors",
    )
    (out / "manifest.json").write_text(manifest.model_dump_json(indent=2))
    return out


def random_shards(out: Path, bundle: Path, num_rows: int, latent_size: int, seed: int) -> Path:
    """Seeded random latents and embeddings at the bundle's shapes (SD3: 77 CLIP + 77 T5)."""
    rng = np.random.default_rng(seed)
    t5 = json.loads((bundle / "text_encoder_3" / "config.json").read_text())
    clip_width = sum(
        json.loads((bundle / name / "config.json").read_text())["hidden_size"]
        for name in ("text_encoder", "text_encoder_2")
    )
    normal = rng.standard_normal
    return write_shards(
        out,
        bundle,
        normal((num_rows, 16, latent_size, latent_size), dtype=np.float32),
        normal((num_rows, 154, t5["d_model"]), dtype=np.float32),
        normal((num_rows, clip_width), dtype=np.float32),
        (np.zeros((154, t5["d_model"]), np.float32), np.zeros((clip_width,), np.float32)),
    )


def time_loop(config: TrainConfig, steps: int) -> dict[str, Any]:
    """The plain loop a user writes: data in memory, one process, torch's default threads."""
    device = torch.device("cpu")
    plan = plan_run(config, config.bundle.uri, Storage())
    bucket = next(iter(plan.buckets.values()))
    table = pq.read_table(bucket.files[0])
    arrays = embeddings_and_latents(table)
    torch.manual_seed(config.seed)
    objective = RectifiedFlow(config, plan, device)
    model = objective.model
    params = [p for p in model.parameters() if p.requires_grad]
    optim = config.optimizer
    optimizer = torch.optim.AdamW(
        params, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, optim.warmup_steps, config.max_steps, optim.min_lr_ratio),
    )
    ema = EMAModel(params, decay=config.ema_decay, foreach=True)
    n = config.batch_size
    step_times = []
    for step in range(steps):
        start = time.perf_counter()
        rows = slice((step * n) % len(table), (step * n) % len(table) + n)
        generator = torch.Generator().manual_seed(step)
        batch = _to_model_inputs(
            {k: v[rows] for k, v in arrays.items()}, plan, config.caption, generator, device
        )
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective.loss(model, batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        optimizer.step()
        schedule.step()
        ema.step(params)
        step_times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "step_times_s": step_times}


def time_raygen(config: TrainConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run_train(config)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in Path(config.output, "metrics.jsonl").open()]
    return {
        "num_workers": config.num_workers,
        "cpus_per_worker": config.cpus_per_worker,
        "wall_s": wall,
        # Step end to step end, as the worker's clock saw it: all a step costs (metric reports
        # and checkpoints included), where step_time_s is the forward/backward/update alone.
        "step_times_s": [b["time"] - a["time"] for a, b in itertools.pairwise(records)],
        "compute_times_s": [r["step_time_s"] for r in records],
        "data_wait_fraction": [r["data_wait_fraction"] for r in records],
    }


def steady(values: list[float]) -> float:
    return statistics.median(values[WARMUP_STEPS:])


def run_distill_benchmark(work: Path, teacher: Path, steps: int, **values: Any) -> dict[str, Any]:
    """`raygen distill` of the tiny SD3 teacher, then the distance of student and teacher
    few-step samples to the teacher's 32-step samples (same held-out prompts and noise).

    tests/flows/test_distill.py holds raygen to the >= 2x claim with this function. The recipe
    (found by sweeping on this teacher, DistillConfig's defaults otherwise): latents
    16x4x4 (32 px), 256 captions encoded by the teacher with 16 T5 tokens, batch 16, AdamW at
    2e-3 decaying to 0, 16 teacher steps, target EMA 0.5; the exported weights are the raw
    student (ema_decay 0), as in the test."""
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(CAPTION_WORDS, 6)) for _ in range(256)]
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher)
    with torch.no_grad():
        embeds, empty, pooled, empty_pooled = pipe.encode_prompt(
            captions, None, None, negative_prompt="", max_sequence_length=16
        )
    rows = rng.integers(len(captions), size=1024)
    shards = write_shards(
        work / "distill-shards",
        teacher,
        rng.standard_normal((1024, 16, 4, 4), dtype=np.float32),
        embeds.numpy()[rows],
        pooled.numpy()[rows],
        (empty[0].numpy(), empty_pooled[0].numpy()),
    )
    num_cpus = os.cpu_count() or 2
    config = load_config(
        DistillConfig,
        values={
            "teacher.uri": str(teacher),
            "data": str(shards),
            "output": str(work / "distill"),
            "num_workers": 1,
            "cpus_per_worker": num_cpus,
            "ray.num_cpus": num_cpus + 1,
            "batch_size": 16,
            "max_steps": steps,
            "checkpoint_every": steps,
            "log_every": 50,
            "caption": "original",
            "ema_decay": 0.0,
            "optimizer.learning_rate": 2e-3,
            "optimizer.warmup_steps": 0,
            "optimizer.min_lr_ratio": 0.0,
            "optimizer.max_grad_norm": None,
            **values,  # DistillConfig fields the recipe leaves alone (e.g. sample_every)
        },
    )
    start = time.perf_counter()
    result = run_distill(config)
    wall = time.perf_counter() - start
    held_out = [" ".join(rng.choice(CAPTION_WORDS, 6)) for _ in range(8)]
    mse = distance_to_teacher(
        teacher, result.bundle, held_out, seed=1, guidance_scale=4.5, max_sequence_length=16
    )
    return {
        "steps": steps,
        "wall_s": wall,
        "mse": mse,
        "bundle": str(result.bundle),
        "recipe": config.model_dump(mode="json"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps, smaller model")
    parser.add_argument("--steps", type=int, default=30, help="training steps per contender")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    parser.add_argument("--no-distill", action="store_true", help="skip the distillation part")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    steps = 12 if args.quick else args.steps
    layers, heads = (2, 4) if args.quick else (6, 8)
    work = Path(tempfile.mkdtemp(prefix="raygen-bench-train-"))
    tiny = build_tiny_bundles(work / "tiny", names=["t2i"])
    bundle, num_params = build_bundle(work, tiny["t2i"], layers, heads, seed=0)
    latent_size = 16 if args.quick else 32
    shards = random_shards(work / "shards", bundle, 8 * steps, latent_size, seed=0)

    def config(output: str, **values: Any) -> TrainConfig:
        return load_config(
            TrainConfig,
            values={
                "data": str(shards),
                "output": str(work / output),
                "bundle.uri": str(bundle),
                "batch_size": 4,
                "max_steps": steps,
                "checkpoint_every": steps,
                "caption": "original",
                "cfg_dropout": 0.1,
                **values,
            },
        )

    num_cpus = os.cpu_count() or 2
    loop = time_loop(config("loop"), steps)
    # Ray gets one logical CPU more than the machine has: Ray Data lists the shard files with
    # a task that reserves a whole CPU, and the workers reserve the cores their torch threads
    # use (threads = reserved CPUs, rounded up), so the loop and the workers get equal threads.
    ray_cpus = num_cpus + 1
    one = time_raygen(
        config("one", num_workers=1, cpus_per_worker=num_cpus, **{"ray.num_cpus": ray_cpus})
    )
    two = time_raygen(
        config("two", num_workers=2, cpus_per_worker=num_cpus / 2, **{"ray.num_cpus": ray_cpus})
    )
    loop_step, one_step, two_step = (steady(r["step_times_s"]) for r in (loop, one, two))
    summary: dict[str, Any] = {
        "machine": {"cpus": num_cpus, "platform": platform.platform(), "python": sys.version},
        "model": {
            "class": "SD3Transformer2DModel",
            "params": num_params,
            "layers": layers,
            "heads": heads,
            "latent": [16, latent_size, latent_size],
        },
        "batch_size": 4,
        "steps": steps,
        "loop": {**loop, "steps_per_s": 1 / loop_step},
        "raygen_1_worker": {
            **one,
            "steps_per_s": 1 / one_step,
            "data_wait_fraction_median": steady(one["data_wait_fraction"]),
        },
        "raygen_2_workers": {
            **two,
            "steps_per_s": 1 / two_step,
            "data_wait_fraction_median": steady(two["data_wait_fraction"]),
        },
        "ratio_1_worker_vs_loop": loop_step / one_step,
        "ray_train_overhead": 1 - loop_step / one_step,
        "ratio_2_vs_1_workers": one_step / two_step,
    }
    if not args.no_distill:
        summary["distill"] = run_distill_benchmark(
            work, tiny["t2i"], steps=100 if args.quick else 1000
        )
    print(report(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def report(s: dict[str, Any]) -> str:
    model = s["model"]
    lines = [
        f"model: SD3Transformer2DModel {model['params'] / 1e6:.1f}M params, latents "
        f"{'x'.join(map(str, model['latent']))}, global batch {s['batch_size']}, {s['steps']} "
        f"steps (medians after {WARMUP_STEPS} warm-up steps)",
        f"loop (1 process, {s['loop']['threads']} threads): {s['loop']['steps_per_s']:.3f} steps/s",
        f"raygen train, 1 worker: {s['raygen_1_worker']['steps_per_s']:.3f} steps/s "
        f"(ratio {s['ratio_1_worker_vs_loop']:.3f}, overhead {s['ray_train_overhead']:.1%}, "
        f"target <= 10%), data wait {s['raygen_1_worker']['data_wait_fraction_median']:.1%} "
        f"(target < 5%), wall {s['raygen_1_worker']['wall_s']:.0f} s",
        f"raygen train, 2 workers: {s['raygen_2_workers']['steps_per_s']:.3f} steps/s "
        f"({s['ratio_2_vs_1_workers']:.2f}x one worker), data wait "
        f"{s['raygen_2_workers']['data_wait_fraction_median']:.1%}, "
        f"wall {s['raygen_2_workers']['wall_s']:.0f} s",
    ]
    if "distill" in s:
        d = s["distill"]["mse"]
        lines.append(
            "distill: MSE to the teacher's reference samples: "
            + ", ".join(f"{k} {v:.4g}" for k, v in d.items())
            + f"; teacher_4 / student_4 = {d['teacher_4'] / d['student_4']:.2f} (target >= 2)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
