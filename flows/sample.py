"""`raygen sample`: a bundle's images for prompts x seeds, written as a corpus `raygen prep`
reads (each image beside a ``.txt`` caption: its prompt). DreamBooth's class images for
prior preservation are made this way ("a photo of a dog" from the base model), as diffusers'
DreamBooth scripts make them, here as a Ray Data batch job through `raygen evaluate`'s
generation stage (the same images for the same prompt, seed and settings).

Layout of ``output``: ``train/<index>.png`` (``.mp4`` for a video bundle) and
``train/<index>.txt``, and ``samples.json`` (the bundle, the settings and every file).
"""

from __future__ import annotations

import json
import time
from typing import Any

import ray

from actors.families import family_of
from cluster.ray_runtime import init_ray
from cluster.storage import Storage, join
from flows.evaluate import bundle_images, prompt_rows, prompts_file, sampling_kwargs
from schemas.config import ConfigError, SampleConfig

MEDIA_DIR = "train"  # as `raygen data shapes` writes its corpus
SAMPLES_FILE = "samples.json"


def run_sample(config: SampleConfig) -> dict[str, Any]:
    started = time.perf_counter()
    storage = Storage(config.storage)
    storage.check(config.output)
    if config.prompts is not None and config.prompt is None:
        prompts = prompts_file(config.prompts, storage)
    elif config.prompt is not None and config.prompts is None:
        prompts = [config.prompt]
    else:
        raise ConfigError("prompt: give a prompt (--prompt) or a prompts file (--prompts)")
    video = family_of(config.bundle.uri, storage).media == "video"
    rows = prompt_rows(prompts, config.seeds, config.first_seed)
    print(
        f"sample: {len(prompts)} prompts x {config.seeds} seeds from {config.bundle.uri} "
        f"-> {join(config.output, MEDIA_DIR)}",
        flush=True,
    )
    init_ray(config.ray)
    files = []
    # Written as they come (a driver loop over the stream): a long job keeps what it made.
    for done, row in enumerate(bundle_images(ray.data.from_items(rows), config).iter_rows(), 1):
        name = f"{MEDIA_DIR}/{row['index']:06d}"
        media = f"{name}.mp4" if video else f"{name}.png"
        storage.write_bytes(join(config.output, media), row["video"] if video else row["image"])
        storage.write_bytes(join(config.output, f"{name}.txt"), (row["prompt"] + "\n").encode())
        files.append({"file": media, "caption": row["prompt"], "seed": int(row["seed"])})
        if done % max(1, len(rows) // 10) == 0 or done == len(rows):
            print(f"sample: {done}/{len(rows)} written", flush=True)
    files.sort(key=lambda item: item["file"])
    result = {
        "bundle": config.bundle.uri,
        "prompts": prompts,
        "settings": {
            **sampling_kwargs(config),
            **({"num_frames": config.num_frames} if video else {}),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "files": files,
    }
    storage.write_bytes(join(config.output, SAMPLES_FILE), json.dumps(result, indent=1).encode())
    print(
        f"sample: {len(files)} {'videos' if video else 'images'} in {result['seconds']} s; "
        f"prep reads {join(config.output, MEDIA_DIR)}",
        flush=True,
    )
    return result
