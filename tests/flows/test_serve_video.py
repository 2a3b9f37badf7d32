"""Video jobs on a real local Ray Serve with tiny bundles (`flows/serve.py`'s video graph):
submit (202), progress, the MP4 behind the job's URL, cancelling queued and running jobs,
the queue bound (503), validation 422s naming the field, and job records shared by every
ingress replica.

The staged video's parity with ``WanPipeline`` is checked at the class level
(``tests/actors/test_video.py``); here the MP4 is checked against the pipeline's frames to
H.264's loss.
"""

import io
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from ray import serve

from flows.models import build_tiny_bundles
from flows.serve import APP_NAME, build_app
from schemas.config import ServeConfig, ServeVideoConfig, VideoDeployments
from tests.conftest import free_port

pytestmark = pytest.mark.slow

HEIGHT, WIDTH, NUM_FRAMES = 32, 48, 5
NUM_STEPS = 3
MAX_SEQUENCE_LENGTH = 16
PROMPT = "a red car driving through the city at night"
BLOCKED = "forbidden fruit"


@dataclass(frozen=True)
class Server:
    url: str
    config: ServeConfig


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2i", "t2v"])


@pytest.fixture(scope="module")
def server(
    bundles: dict[str, Path], ray_local: None, tmp_path_factory: pytest.TempPathFactory
) -> Server:
    stage = {"num_cpus": 0.1}
    config = ServeConfig.model_validate(
        {
            "bundle": {"uri": str(bundles["t2i"])},
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            "retry_after_s": 3,
            "output": str(tmp_path_factory.mktemp("outputs")),
            "safety": {"blocklist": [BLOCKED]},
            # Two ingress replicas: a job's record must not depend on which one answers.
            "deployments": {
                "ingress": {**stage, "num_replicas": 2},
                "text_encoder": stage,
                "base": stage,
                "vae_decode": stage,
                "safety": stage,
            },
            "video": {
                "bundle": {"uri": str(bundles["t2v"])},
                "max_height": 64,
                "max_width": 64,
                "max_num_frames": 9,
                "max_sequence_length": MAX_SEQUENCE_LENGTH,
                "max_running_jobs": 1,
                "max_jobs": 2,
                "deployments": {
                    "jobs": stage,
                    "text_encoder": stage,
                    "denoiser": stage,
                    "vae_decode": stage,
                },
            },
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", config)
    finally:
        serve.shutdown()


def call(
    server: Server, path: str, body: dict[str, Any] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw bytes)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.url + path if path.startswith("/") else path,
        data=data,
        headers={"Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, head, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, head, payload = err.code, dict(err.headers), err.read()
    if head.get("content-type", "").startswith("application/json"):
        return status, head, json.loads(payload)
    return status, head, payload


def submit(server: Server, **fields: Any) -> dict[str, Any]:
    body = {
        "prompt": PROMPT,
        "height": HEIGHT,
        "width": WIDTH,
        "num_frames": NUM_FRAMES,
        "num_inference_steps": NUM_STEPS,
        **fields,
    }
    status, _, job = call(server, "/v1/videos", body)
    assert status == 202, job
    assert job["status"] in ("queued", "running")
    return job


def poll(server: Server, job_id: str, until: Any, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, _, job = call(server, f"/v1/videos/{job_id}")
        assert status == 200, job
        if until(job):
            return job
        assert time.monotonic() < deadline, f"job never reached the state: {job}"
        time.sleep(0.1)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def test_a_video_job_runs_to_an_mp4_matching_the_pipeline(server, bundles):
    job = submit(server, seed=11, negative_prompt="blurry")
    assert job["num_steps"] == NUM_STEPS and job["seed"] == 11 and job["url"] is None
    done = poll(server, job["id"], finished)
    assert done["status"] == "succeeded", done
    assert done["step"] == NUM_STEPS
    assert {"text_encoder", "denoiser", "vae_decode", "store", "total"} <= set(
        done["stage_seconds"]
    )
    assert done["url"].startswith(server.url + "/v1/files/") and done["url"].endswith(".mp4")
    status, head, mp4 = call(server, done["url"])
    assert status == 200 and head["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)

    pipe = WanPipeline.from_pretrained(bundles["t2v"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt=PROMPT,
        negative_prompt="blurry",
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        generator=torch.Generator("cpu").manual_seed(11),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
    ).frames[0]
    # H.264 (yuv420p, chroma at half resolution) is lossy: close on average, not bit-exact.
    error = np.abs(frames.astype(np.float32) / 255 - expected).mean()
    print(f"mean abs error of the MP4 frames: {error:.4f}")
    assert error < 0.08


def test_cancel_running_and_queued_jobs_and_the_queue_bound(server):
    running = submit(server, num_inference_steps=200, seed=1)
    queued = submit(server, seed=2)
    # max_jobs is 2: a third is refused until one finishes.
    status, head, payload = call(
        server, "/v1/videos", {"prompt": PROMPT, "height": HEIGHT, "width": WIDTH, "num_frames": 5}
    )
    assert status == 503 and head["retry-after"] == "3", payload
    poll(server, running["id"], lambda job: job["status"] == "running" and job["step"] >= 1)

    status, _, cancelled = call(server, f"/v1/videos/{queued['id']}", method="DELETE")
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["step"] == 0
    status, _, cancelled = call(server, f"/v1/videos/{running['id']}", method="DELETE")
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    assert 1 <= cancelled["step"] < 200
    # The denoiser stops between steps: the step count stays where it was.
    time.sleep(1.5)
    later = poll(server, running["id"], finished)
    assert later["status"] == "cancelled" and later["url"] is None
    assert later["step"] <= cancelled["step"] + 1
    _, _, stats = call(server, "/v1/stats")
    steps = stats["video_jobs"]
    assert steps["cancelled"] == 2, stats
    # The queue has room again, and a finished job stays as it was when cancelled.
    job = submit(server, seed=3)
    assert poll(server, job["id"], finished)["status"] == "succeeded"
    status, _, same = call(server, f"/v1/videos/{job['id']}", method="DELETE")
    assert status == 200 and same["status"] == "succeeded"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"num_frames": 6}, "num_frames", "multiple of 4"),
        ({"num_frames": 13}, "num_frames", "at most 9"),
        ({"height": 24}, "height", "multiple of 16"),
        ({"width": 80}, "width", "at most 64"),
        ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal"),
        ({"prompt": " "}, "prompt", "blank"),
    ],
)
def test_invalid_video_requests_are_422_naming_the_field(server, fields, field, message):
    body = {"prompt": PROMPT, "height": HEIGHT, "width": WIDTH, "num_frames": 5, **fields}
    status, _, payload = call(server, "/v1/videos", body)
    assert status == 422, payload
    [error] = payload["detail"]
    assert error["loc"] == ["body", field]
    assert message in error["msg"]


def test_blocked_prompts_and_unknown_jobs(server):
    status, _, payload = call(
        server,
        "/v1/videos",
        {"prompt": f"a {BLOCKED}", "height": HEIGHT, "width": WIDTH, "num_frames": NUM_FRAMES},
    )
    assert status == 400 and payload["detail"]["code"] == "prompt_blocked"
    for method in ("GET", "DELETE"):
        status, _, _ = call(server, "/v1/videos/" + "0" * 32, method=method)
        assert status == 404


def test_video_config_checks():
    with pytest.raises(ValueError, match="exactly one replica"):
        VideoDeployments.model_validate({"jobs": {"num_replicas": 2}})
    assert ServeConfig().video is None
    assert ServeVideoConfig().bundle.uri.endswith("bundles/t2v")
