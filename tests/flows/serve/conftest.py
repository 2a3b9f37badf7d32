"""One Serve app for the image and the video tests: the image graph (base, refiner, a
super-resolution stage, the safety checker), a second model's graph (SDXL with its refiner)
and the video jobs (Wan image-to-video), on a real local Ray Serve with tiny bundles, outputs on the S3 test
server. Started once for the package: each app start is a score of replica processes that
import torch and diffusers and load their bundles, most of a minute on a 2-core machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.storage import Storage
from flows.models import build_tiny_bundles, build_tiny_lora
from flows.serve import APP_NAME, build_app
from schemas.config import ServeConfig, StorageConfig
from tests.conftest import S3_REGION, free_port

API_KEYS_ENV = "RAYGEN_TEST_SERVE_API_KEYS"
# Distinctive, so the tests can check that no log line ever holds one.
API_KEY = "rk-test-7c1e9b2f40d8"
SECOND_KEY = "rk-test-second-55aa"
MAX_SEQUENCE_LENGTH = 16
BLOCKED = "forbidden fruit"
RETRY_AFTER_S = 2
# Adapter sets a base replica holds: three sets in turn evict the first.
MAX_ADAPTER_SETS = 2


@dataclass(frozen=True)
class Server:
    url: str
    graph: DeploymentHandle
    config: ServeConfig


@dataclass(frozen=True)
class Adapters:
    """LoRAs in diffusers' format: local folders (for the reference pipelines) and the
    server's registry on the S3 test server, holding all but ``late``."""

    local: dict[str, Path]
    registry: str
    late: str  # built, not yet in the registry: a test adds it while the server runs


@pytest.fixture(scope="package")
def storage(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> StorageConfig:
    return StorageConfig(
        endpoint_url=s3_server,
        region=S3_REGION,
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )


@pytest.fixture(scope="package")
def adapters(
    bundles: dict[str, Path],
    output_bucket: str,
    storage: StorageConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Adapters:
    root = tmp_path_factory.mktemp("loras")
    local = {
        name: build_tiny_lora(bundles["t2i"], root / name, seed=seed)
        for seed, name in enumerate(("style-a", "style-b", "style-c", "late-d"), start=1)
    }
    # Made for a transformer of other widths: this base cannot load it.
    local["other-base"] = build_tiny_lora(bundles["t2i"], root / "other-base", seed=9, heads=3)
    registry = f"{output_bucket}/loras"
    for name, folder in local.items():
        if name != "late-d":
            Storage(storage).upload_dir(folder, Storage.join(registry, name))
    return Adapters(local, registry, "late-d")


@pytest.fixture(scope="package")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(
        tmp_path_factory.mktemp("bundles"),
        names=["t2i", "refiner", "upscaler", "nsfw", "t2v", "i2v", "sdxl", "sdxl-refiner"],
    )


@pytest.fixture(scope="package")
def output_bucket(s3_client: Any) -> str:
    name = f"serve-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


def serve_config(
    bundles: dict[str, Path],
    output: str,
    storage: StorageConfig,
    api_keys_env: str | None,
    loras_registry: str | None = None,
) -> ServeConfig:
    # Every stage at a twentieth of a CPU: two dozen replicas fit the 2-CPU local Ray, with
    # room left for the jobs some tests run beside them.
    stage = {"num_cpus": 0.05}
    return ServeConfig.model_validate(
        {
            "bundle": {"uri": str(bundles["t2i"])},
            "refiner": {"uri": str(bundles["refiner"])},
            "super_resolution": [
                {
                    "model": {"uri": str(bundles["upscaler"])},
                    "noise_level": 20,
                    "num_inference_steps": 2,
                    "deployment": stage,
                }
            ],
            "max_height": 64,
            "max_width": 64,
            "max_images_per_request": 2,
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "request_timeout_s": 60,
            "retry_after_s": RETRY_AFTER_S,
            "api_keys_env": api_keys_env,
            "output": output,
            "safety": {
                "blocklist": [BLOCKED],
                "image_checker": {"uri": str(bundles["nsfw"])},
                # The tiny classifier's scores are random: check every image (and every video
                # frame), flag none. The flagged case: the decode stages' own tests.
                "max_nsfw_score": 1.0,
            },
            "deployments": {
                # One ingress replica: with two, the overload test's ten requests all queued
                # at the base instead of overflowing (issue 10's notes).
                "ingress": stage,
                "text_encoder": stage,
                # Two requests in a batch, two more waiting (a request of n images makes n
                # calls at once): the overload test overflows them.
                "base": {
                    **stage,
                    "max_ongoing_requests": 2,
                    "max_batch_size": 2,
                    "batch_wait_timeout_s": 0.1,
                    "max_queued_requests": 2,
                },
                "refiner": stage,
                "vae_decode": stage,
                "safety": stage,
            },
            # Wan image-to-video: its jobs run text-to-video's path plus the input image's.
            "video": {
                "bundle": {"uri": str(bundles["i2v"])},
                "max_height": 64,
                "max_width": 64,
                "max_num_frames": 33,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
                "max_running_jobs": 1,
                "max_jobs": 2,
                "deployments": {
                    # A killed replica is noticed within a second.
                    "jobs": {**stage, "health_check_period_s": 1},
                    "text_encoder": stage,
                    "denoiser": stage,
                    "vae_decode": stage,
                },
            },
            # Another family beside the main model: its own graph, picked by `model`. SDXL's
            # refiner reads CLIP-G alone: it holds that text encoder itself.
            "models": [
                {
                    "name": "sdxl",
                    "bundle": {"uri": str(bundles["sdxl"])},
                    "refiner": {"uri": str(bundles["sdxl-refiner"])},
                    "deployments": {
                        name: stage
                        for name in ("graph", "text_encoder", "base", "refiner", "vae_decode")
                    },
                },
            ],
            "loras": None
            if loras_registry is None
            else {"registry": loras_registry, "max_per_replica": MAX_ADAPTER_SETS, "rescan_s": 60},
            "storage": storage.model_dump(),
        }
    )


@pytest.fixture(scope="package")
def server(
    bundles: dict[str, Path],
    output_bucket: str,
    storage: StorageConfig,
    ray_local: None,
    adapters: Adapters,
) -> Iterator[Server]:
    os.environ[API_KEYS_ENV] = f"{API_KEY}, {SECOND_KEY}"
    config = serve_config(
        bundles, f"{output_bucket}/outputs", storage, API_KEYS_ENV, adapters.registry
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        graph = serve.get_deployment_handle("graph", APP_NAME)
        yield Server(f"http://127.0.0.1:{port}", graph, config)
    finally:
        serve.shutdown()
        os.environ.pop(API_KEYS_ENV, None)
