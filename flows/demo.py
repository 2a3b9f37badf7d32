"""`raygen demo`: the main job on the embedded defaults, end to end on a laptop.

Local Ray, local storage under one data folder, tiny bundles. It grows with every flow that
lands: today it builds the bundles and a sample corpus (broken files included), preps the
corpus into shards on Ray Data, fine-tunes the tiny SD3 bundle on them with Ray Train, then
generates an image on Ray from the bundle that training wrote.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from actors.loaders import load_pipeline
from cluster.ray_runtime import init_ray
from flows.models import build_tiny_bundles
from flows.prep import run_prep
from flows.samples import build_sample_corpus
from flows.train import run_train
from schemas.config import ModelRef, PrepConfig, RayConfig, TrainConfig, load_config

DEMO_PROMPT = "a red circle on a blue background"


@ray.remote
def generate_sample(bundle_uri: str, prompt: str, seed: int, out_path: str) -> tuple[int, int]:
    """Load the bundle where the task runs (never in the driver) and write one PNG."""
    import torch

    # The pipeline class the bundle's model_index.json names (the trained SD3 bundle's).
    pipe = load_pipeline(ModelRef(uri=bundle_uri))
    pipe.set_progress_bar_config(disable=True)  # one image: the demo's own lines say enough
    image = pipe(
        prompt,
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    image.save(out_path)
    return image.size


def run_demo(data_dir: str | Path) -> None:
    data = Path(data_dir).resolve()
    started = time.perf_counter()

    print(f"[1/5] tiny model bundles -> {data / 'bundles'}")
    bundles = build_tiny_bundles(data / "bundles")
    for name, path in bundles.items():
        size_kb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024
        print(f"      {name:<10} {size_kb:8.0f} KiB  {path}")

    print(f"[2/5] sample corpus -> {data / 'corpus'}")
    counts = build_sample_corpus(data / "corpus")
    print("      " + ", ".join(f"{count} {kind}" for kind, count in counts.items()))

    print(f"[3/5] prep the corpus into shards on Ray Data -> {data / 'shards'}")
    prep = load_config(
        PrepConfig,
        values={
            "input": str(data / "corpus"),
            "output": str(data / "shards"),
            "bundle.uri": str(bundles["t2i"]),
            "video_bundle.uri": str(bundles["t2v"]),
            "caption.model.uri": str(bundles["captioner"]),
            "filters.scorer.uri": str(bundles["scorer"]),
        },
    )
    run_prep(prep)

    print(f"[4/5] fine-tune the t2i bundle on the shards with Ray Train -> {data / 'runs/train'}")
    train = load_config(
        TrainConfig,
        values={
            "data": str(data / "shards"),
            "output": str(data / "runs" / "train"),
            "bundle.uri": str(bundles["t2i"]),
            "max_steps": 4,
            "checkpoint_every": 4,
            # A re-run of the demo continues the finished run (nothing left to do) instead of
            # refusing an output that already holds one.
            "resume": (data / "runs" / "train" / "ray-train").exists(),
        },
    )
    trained = run_train(train).bundle

    print("[5/5] generate on Ray with the trained bundle (StableDiffusion3Pipeline, 4 steps)")
    init_ray(RayConfig())
    out_path = data / "demo" / "sample.png"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    width, height = ray.get(generate_sample.remote(trained, DEMO_PROMPT, 0, str(out_path)))
    print(f"      {width}x{height} image for {DEMO_PROMPT!r} -> {out_path}")

    print(f"done in {time.perf_counter() - started:.1f}s; everything is under {data}")
    print(
        "next: raygen distill --config configs/distill.yaml; raygen serve --config configs/serve.yaml"
    )
