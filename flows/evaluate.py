"""`raygen evaluate`: how well a bundle follows prompts, measured.

A Ray Data batch job: (prompt, seed) rows -> images from the bundle's pipeline in actors,
batched (actors/evaluation.py: BundleImages), or from a running `raygen serve` (``url``:
ServerImages, the same seeds) -> per-image scores (ImageScores: the shapes
detector's verdicts, the CLIP score) -> ``eval.json`` (settings, metrics, every image's
scores), ``report.md`` (the metrics table and the grid) and ``grid.png`` (a row per prompt,
a column per seed), with the images under ``images/``; local or ``s3://``.

A video bundle (Wan) makes videos: each is stored as an MP4 and as a filmstrip PNG of its
frames, which the detector reads as a video (color and shape from the middle frame, the
direction of motion from the shape's travel); its default prompts are the shapes video
prompts. Evaluation through a server is of images.

Prompt following, GenEval-style: per category (color, shape, place; direction for videos),
the share of images whose prompt names it where the detector sees what the prompt says;
``all`` is the share right in every category the prompt names. Prompts outside the shapes domain count for the CLIP score only.
FID (torchmetrics) compares the generated images with ``fid.reference`` images, decoded by
prep's stages to the same size, in a Ray task; without a reference or local feature
weights it is skipped with its reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import ray
from PIL import Image

from actors.decode import MediaDecoder, decoded_images
from actors.evaluation import (
    BundleImages,
    ImageScores,
    ServerImages,
    fid_skip_reason,
    frechet_distance,
)
from actors.families import family_of
from actors.sources import FetchMedia, list_inputs
from cluster.ray_runtime import init_ray
from cluster.storage import Storage, join
from schemas.config import (
    BucketConfig,
    ConfigError,
    EvaluateConfig,
    PrepConfig,
    SamplingConfig,
)
from schemas.errors import RaygenError
from schemas.shapes import HELD_OUT, VIDEO_PROMPTS

CATEGORIES = ("color", "shape", "place", "direction")  # place: images; direction: videos
GRID_PROMPTS = 12  # rows of grid.png: the first prompts


def source(config: EvaluateConfig) -> str:
    return config.url or config.bundle.uri


def check_server(url: str, timeout_s: float) -> None:
    """Fail within seconds, naming the server, when nothing answers at ``url``."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=min(timeout_s, 5.0)):
            pass
    except urllib.error.HTTPError as err:
        raise RaygenError(f"url: raygen server at {url} answered {err.code} on /health") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RaygenError(f"url: cannot reach a raygen server at {url}: {reason}") from None


def sampling_kwargs(config: SamplingConfig) -> dict[str, Any]:
    """What every image of a sampling job is made with (None: the bundle's or server's own)."""
    return {
        "height": config.height,
        "width": config.width,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
    }


def prompt_rows(prompts: list[str], seeds: int, first_seed: int = 0) -> list[dict[str, Any]]:
    """The (index, prompt, seed) rows of prompts x seeds, prompt-major."""
    return [
        {"index": i * seeds + k, "prompt": prompt, "seed": first_seed + k}
        for i, prompt in enumerate(prompts)
        for k in range(seeds)
    ]


def bundle_images(ds: ray.data.Dataset, config: SamplingConfig) -> ray.data.Dataset:
    """Rows with ``prompt`` and ``seed`` -> ``image`` (a PNG; a video's filmstrip), ``frames``
    and, for a video bundle, ``video`` (MP4): the bundle's pipeline in an actor pool."""
    resources = config.generate
    return ds.map_batches(
        BundleImages,
        fn_constructor_kwargs={
            "bundle": config.bundle,
            "storage": config.storage,
            **sampling_kwargs(config),
            "max_sequence_length": config.max_sequence_length,
            "num_frames": config.num_frames,
            "fps": config.fps,
        },
        batch_format="numpy",
        batch_size=resources.batch_size,
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )


def read_prompts(config: EvaluateConfig, storage: Storage, video: bool = False) -> list[str]:
    if config.prompts is None:
        return [caption.text for caption in (VIDEO_PROMPTS if video else HELD_OUT)]
    return prompts_file(config.prompts, storage)


def prompts_file(uri: str, storage: Storage) -> list[str]:
    """The prompts of a text file (local or s3://), one a line; blank lines skipped."""
    if not storage.exists(uri):
        raise ConfigError(f"prompts: no file {uri}")
    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts: {uri} has no prompts (one a line)")
    return prompts


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics over scored rows: per-category accuracy over the rows whose prompt names
    the category (``all``: right in every category it names), and the mean CLIP score."""
    metrics: dict[str, Any] = {}
    scored = [row for row in rows if any(row.get(c) is not None for c in CATEGORIES)]
    if scored:
        following = {
            c: float(np.mean([bool(row[c]) for row in named]))
            for c in CATEGORIES
            if (named := [row for row in scored if row.get(c) is not None])
        }
        following["all"] = float(
            np.mean([all(row[c] for c in CATEGORIES if row.get(c) is not None) for row in scored])
        )
        metrics["prompt_following"] = {**following, "images": len(scored)}
    clip = [row["clip_score"] for row in rows if not math.isnan(row["clip_score"])]
    if clip:
        metrics["clip_score"] = {"mean": float(np.mean(clip)), "images": len(clip)}
    return metrics


def reference_items(config: EvaluateConfig, storage: Storage) -> tuple[PrepConfig, list[dict]]:
    """The reference images' inputs, read as prep reads its input, decoded (in the FID task)
    to the generated images' square size."""
    assert config.fid.reference is not None
    prep = PrepConfig(
        input=config.fid.reference,
        buckets=BucketConfig(resolution=config.height, step=config.height, max_aspect=1.0),
        storage=config.storage,
    )
    try:
        items = list_inputs(prep, storage)
    except RaygenError as err:  # a missing or empty folder, named by list_inputs
        raise ConfigError(f"fid.reference: {err}") from None
    return prep, items[: config.fid.max_reference_images]


@ray.remote(num_cpus=1)
def fid_score(
    generated: list[bytes], prep: PrepConfig, items: list[dict], config: EvaluateConfig
) -> float:
    """FID of the generated PNGs against the decoded reference images (a task: the driver
    imports no model)."""
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    decoded = MediaDecoder(prep.decode, prep.buckets)(FetchMedia(prep.decode, prep.storage)(batch))
    reference = decoded_images(decoded)["pixels"]  # (M, H, W, 3)
    if len(reference) < 2:
        raise ConfigError(
            f"fid.reference: {config.fid.reference} has {len(reference)} decodable images; "
            f"FID needs at least 2"
        )
    fake = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in generated])
    return frechet_distance(fake, reference, config.fid, config.storage)


def grid_png(rows: list[dict[str, Any]], prompts: list[str], seeds: int) -> bytes:
    """A row per prompt (the first GRID_PROMPTS), a column per seed."""
    shown = prompts[:GRID_PROMPTS]
    images = {(row["prompt"], row["seed"]): Image.open(io.BytesIO(row["image"])) for row in rows}
    width, height = next(iter(images.values())).size
    grid = Image.new("RGB", (seeds * width, len(shown) * height), "white")
    for r, prompt in enumerate(shown):
        for seed in range(seeds):
            grid.paste(images[(prompt, seed)].convert("RGB"), (seed * width, r * height))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue()


def report_markdown(
    config: EvaluateConfig, metrics: dict[str, Any], prompts: list[str], video: bool = False
) -> str:
    lines = [
        f"# Evaluation of {source(config)}",
        "",
        f"{len(prompts)} prompts x {config.seeds} seeds at {config.width}x{config.height}"
        + (
            f", {config.num_frames} frames a video (a filmstrip each in the grid)."
            if video
            else "."
        ),
        "",
        "| metric | value | images |",
        "| --- | --- | --- |",
    ]
    following = metrics.get("prompt_following")
    if following:
        for category in (*(c for c in CATEGORIES if c in following), "all"):
            lines.append(
                f"| prompt following: {category} | {following[category]:.3f} | "
                f"{following['images']} |"
            )
    if "clip_score" in metrics:
        clip = metrics["clip_score"]
        lines.append(f"| CLIP score | {clip['mean']:.2f} | {clip['images']} |")
    fid = metrics.get("fid")
    if fid and "value" in fid:
        lines.append(
            f"| FID ({fid['reference']} reference) | {fid['value']:.2f} | {fid['images']} |"
        )
    elif fid:
        lines.append(f"| FID | skipped: {fid['skipped']} | |")
    shown = min(len(prompts), GRID_PROMPTS)
    lines += [
        "",
        f"![a row per prompt (the first {shown}), a column per seed](grid.png)",
        "",
        "Prompts, top to bottom: " + "; ".join(prompts[:shown]),
        "",
    ]
    return "\n".join(lines)


def run_evaluate(config: EvaluateConfig) -> dict[str, Any]:
    started = time.perf_counter()
    storage = Storage(config.storage)
    storage.check(config.output)
    # A video bundle makes videos (read for their direction of motion); a server, images.
    video = config.url is None and family_of(config.bundle.uri, storage).media == "video"
    prompts = read_prompts(config, storage, video)
    clip = config.clip if "clip_score" in config.metrics else None
    fid_skipped = fid_skip_reason(config.fid) if "fid" in config.metrics else None
    if video and "fid" in config.metrics:
        fid_skipped = "a video model: FID compares images"
    if "fid" in config.metrics and fid_skipped is None:
        reference = reference_items(config, storage)  # a bad folder fails here, before any work
    rows = prompt_rows(prompts, config.seeds)
    print(
        f"evaluate: {len(prompts)} prompts x {config.seeds} seeds from {source(config)}; "
        f"metrics: {', '.join(config.metrics)}",
        flush=True,
    )

    if config.url:
        check_server(config.url, config.request_timeout_s)

    init_ray(config.ray)
    resources = config.generate
    ds = ray.data.from_items(rows)
    if config.url:
        # The server does the work: the stage only waits on HTTP, on a sliver of a CPU.
        ds = ds.map_batches(
            ServerImages,
            fn_constructor_kwargs={
                "url": config.url,
                "api_key": os.environ.get("RAYGEN_API_KEY"),
                "timeout_s": config.request_timeout_s,
                **sampling_kwargs(config),
            },
            batch_format="numpy",
            batch_size=resources.batch_size,
            compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
            num_cpus=0.1,
        )
    else:
        ds = bundle_images(ds, config)
    ds = ds.map_batches(
        ImageScores,
        fn_constructor_kwargs={"clip": clip, "storage": config.storage},
        batch_format="numpy",
        batch_size=resources.batch_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    scored = sorted(ds.take_all(), key=lambda row: row["index"])

    if "prompt_following" not in config.metrics:
        for row in scored:
            row.update(dict.fromkeys(CATEGORIES))
    metrics = summarize(scored)
    if "fid" in config.metrics:
        if fid_skipped is not None:
            metrics["fid"] = {"skipped": fid_skipped}
        else:
            images = [row["image"] for row in scored]
            value = ray.get(fid_score.remote(images, *reference, config))
            metrics["fid"] = {"value": value, "images": len(images), "reference": len(reference[1])}
    images = []
    for row in scored:
        name = f"images/{row['index']:04d}-seed{row['seed']}.png"
        storage.write_bytes(join(config.output, name), row["image"])
        if video:
            storage.write_bytes(join(config.output, name[:-4] + ".mp4"), row["video"])
        images.append(
            {
                "file": name,
                **({"video": name[:-4] + ".mp4", "frames": int(row["frames"])} if video else {}),
                "prompt": row["prompt"],
                "seed": int(row["seed"]),
                **{c: row[c] for c in CATEGORIES if row[c] is not None},
                **{f"seen_{c}": row[f"seen_{c}"] for c in CATEGORIES},
                **({} if math.isnan(row["clip_score"]) else {"clip_score": row["clip_score"]}),
            }
        )
    result = {
        "bundle": None if config.url else config.bundle.uri,
        "url": config.url,
        "prompts": len(prompts),
        "seeds": config.seeds,
        "media": "video" if video else "image",
        # None: the bundle's own (a distilled bundle's raygen_sampling.json, else the
        # pipeline's defaults).
        "settings": {
            **sampling_kwargs(config),
            **({"num_frames": config.num_frames} if video else {}),
        },
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 1),
        "images": images,
    }
    storage.write_bytes(join(config.output, "grid.png"), grid_png(scored, prompts, config.seeds))
    storage.write_bytes(
        join(config.output, "report.md"), report_markdown(config, metrics, prompts, video).encode()
    )
    storage.write_bytes(join(config.output, "eval.json"), json.dumps(result, indent=1).encode())
    for name, value in metrics.items():
        print(
            f"evaluate: {name}: "
            + ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()
            )
        )
    print(f"evaluate: report -> {join(config.output, 'report.md')}", flush=True)
    return result
