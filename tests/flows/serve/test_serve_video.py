"""Video jobs on a real local Ray Serve with tiny bundles (`flows/serve/video_jobs.py`):
submit (202) with the picture to animate, progress, the watermarked MP4 behind the job's URL,
the safety check on its frames, cancelling queued and running jobs, the queue bound (503),
validation 422s naming the field (the image's among them), job records kept in storage (the
S3 test server), so that they outlive the video_jobs replica. The app is the one the image
tests use (``conftest.py``); its video model is Wan image-to-video.

The staged video's parity with ``WanPipeline`` and ``WanImageToVideoPipeline`` is checked at
the class level (``tests/actors/test_video.py``); here the MP4 is checked against the
image-to-video pipeline's frames to the watermark's and H.264's loss.
"""

import asyncio
import base64
import io
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import av
import numpy as np
import pytest
import ray
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
from PIL import Image

from actors.video import to_uint8
from actors.watermark import detect_watermark
from flows.cli import main
from flows.serve import APP_NAME
from flows.serve.checks import InvalidInput, video_image
from flows.serve.video_jobs import VIDEO_JOBS_FOLDER, VideoJobs, _Job
from flows.serve.video_stages import VideoDecodeStage
from schemas.api import VideoJob
from schemas.config import (
    ModelRef,
    SafetyConfig,
    ServeConfig,
    ServeVideoConfig,
    StorageConfig,
    VideoDeployments,
)
from tests.actors.rows import image_pixels
from tests.flows.serve.conftest import (
    API_KEY,
    BLOCKED,
    MAX_SEQUENCE_LENGTH,
    RETRY_AFTER_S,
    Server,
)

pytestmark = pytest.mark.slow

HEIGHT, WIDTH, NUM_FRAMES = 32, 48, 5
NUM_STEPS = 3
# A job of the largest size the server takes and the most steps runs for seconds.
# Long enough (seconds) to be killed mid-run after its first progress write, a second in.
LONG_JOB = {"height": 64, "width": 64, "num_frames": 33, "num_inference_steps": 200}
PROMPT = "a red car driving through the city at night"


def picture(height: int = 40, width: int = 52) -> Image.Image:
    """The picture the jobs animate: another size than the video's."""
    return Image.fromarray(image_pixels(width, height, seed=0))


def encoded(image: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = encoded(picture())


def call(
    server: Server, path: str, body: dict[str, Any] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw bytes)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if path.startswith("/"):  # the server's; a presigned URL carries its own signature
        headers["Authorization"] = f"Bearer {API_KEY}"
    request = urllib.request.Request(
        server.url + path if path.startswith("/") else path,
        data=data,
        headers=headers,
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
        "image": IMAGE,
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


def test_a_video_job_runs_to_a_watermarked_mp4_matching_the_pipeline(
    server, bundles, tmp_path, capsys
):
    job = submit(server, seed=11, negative_prompt="blurry")
    assert job["num_steps"] == NUM_STEPS and job["seed"] == 11 and job["url"] is None
    done = poll(server, job["id"], finished)
    assert done["status"] == "succeeded", done
    assert done["step"] == NUM_STEPS and done["nsfw_content_detected"] is False
    assert job["created_at"] <= done["started_at"] <= done["finished_at"] <= time.time()
    assert {"text_encoder", "image_encoder", "denoiser", "vae_decode", "store", "total"} <= set(
        done["stage_seconds"]
    )
    # The output is on S3: a presigned URL to the MP4.
    assert done["url"].startswith(server.config.storage.endpoint_url)
    assert done["url"].split("?")[0].endswith(".mp4")
    status, head, mp4 = call(server, done["url"])
    assert status == 200 and head["content-type"] == "video/mp4"
    with av.open(io.BytesIO(mp4)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)

    pipe = WanImageToVideoPipeline.from_pretrained(bundles["i2v"])
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        image=picture(),
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
    # The watermark and H.264 change the pixels a little: close, not bit-exact.
    error = np.abs(frames.astype(np.float32) / 255 - expected).mean()
    difference = frames.astype(np.float64) - to_uint8(expected)
    psnr = 10 * np.log10(255**2 / np.mean(difference**2))
    print(f"MP4 frames to the pipeline's: mean abs error {error:.4f}, PSNR {psnr:.1f} dB")
    assert error < 0.01 and psnr > 40

    # Every frame carries the invisible watermark, as `raygen watermark detect` reads it.
    path = tmp_path / "video.mp4"
    path.write_bytes(mp4)
    assert (
        main(["watermark", "detect", str(path), "--key", server.config.safety.watermark_key]) == 0
    )
    printed = capsys.readouterr().out
    assert f"video.mp4: watermarked ({NUM_FRAMES}/{NUM_FRAMES} frames carry it" in printed
    assert main(["watermark", "detect", str(path), "--key", "another key"]) == 1


def test_the_video_decode_stage_checks_and_watermarks_every_frame(bundles):
    # The stage's class itself, outside Serve, on random latents (C, f, h, w).
    safety = SafetyConfig(image_checker=ModelRef(uri=str(bundles["nsfw"])), max_nsfw_score=1.0)
    stage = VideoDecodeStage.func_or_class(
        ModelRef(uri=str(bundles["t2v"])), StorageConfig(), safety
    )
    vae = AutoencoderKLWan.load_config(bundles["t2v"], subfolder="vae")
    latent_frames = (NUM_FRAMES - 1) // vae["scale_factor_temporal"] + 1
    side = vae["scale_factor_spatial"]
    latents = torch.randn(
        vae["z_dim"],
        latent_frames,
        HEIGHT // side,
        WIDTH // side,
        generator=torch.Generator().manual_seed(0),
    )

    def decoded(mp4: bytes) -> np.ndarray:
        with av.open(io.BytesIO(mp4)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    mp4, flagged = stage._mp4(latents, 8)
    frames = decoded(mp4)
    assert not flagged and frames.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and frames.std() > 10
    # Any probability is above 0: every frame is flagged, so the video is black; still marked.
    stage.checker.max_nsfw_score = 0.0
    mp4, flagged = stage._mp4(latents, 8)
    frames = decoded(mp4)
    assert flagged and frames.max() <= 8
    assert all(detect_watermark(frame, safety.watermark_key).present for frame in frames)


def test_cancel_running_and_queued_jobs_and_the_queue_bound(server):
    running = submit(server, num_inference_steps=200, seed=1)
    queued = submit(server, seed=2)
    # max_jobs is 2: a third is refused until one finishes.
    third = {"prompt": PROMPT, "height": HEIGHT, "width": WIDTH, "num_frames": 5, "image": IMAGE}
    status, head, payload = call(server, "/v1/videos", third)
    assert status == 503 and head["retry-after"] == str(RETRY_AFTER_S), payload
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
        ({"num_frames": 37}, "num_frames", "at most 33"),
        ({"height": 24}, "height", "multiple of 16"),
        ({"width": 80}, "width", "at most 64"),
        ({"num_inference_steps": 0}, "num_inference_steps", "greater than or equal"),
        ({"prompt": " "}, "prompt", "blank"),
        ({"image": None}, "image", "WanImageToVideoPipeline) animates an image: send one"),
        ({"image": "not base64!"}, "image", "not base64"),
        ({"image": base64.b64encode(b"GIF89a, or so").decode()}, "image", "not a readable image"),
        ({"image": encoded(picture(), "GIF")}, "image", "a GIF image; send a PNG, JPEG or WebP"),
        ({"image": encoded(picture(8, 4097))}, "image", "4097x8: sides must be at most 4096"),
    ],
)
def test_invalid_video_requests_are_422_naming_the_field(server, fields, field, message):
    body = {"prompt": PROMPT, "height": HEIGHT, "width": WIDTH, "num_frames": 5, "image": IMAGE}
    body |= fields
    status, _, payload = call(server, "/v1/videos", body)
    assert status == 422, payload
    [error] = payload["detail"]
    assert error["loc"] == ["body", field]
    assert message in error["msg"]


def test_blocked_prompts_and_unknown_jobs(server):
    status, _, payload = call(
        server,
        "/v1/videos",
        {
            "prompt": f"a {BLOCKED}",
            "height": HEIGHT,
            "width": WIDTH,
            "num_frames": NUM_FRAMES,
            "image": IMAGE,
        },
    )
    assert status == 400 and payload["detail"]["code"] == "prompt_blocked"
    for method in ("GET", "DELETE"):
        status, _, _ = call(server, "/v1/videos/" + "0" * 32, method=method)
        assert status == 404


def video_jobs_replicas() -> list[str]:
    """Names of the live video_jobs replicas' actors (Serve names them after app and
    deployment)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#video_jobs#"
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


def test_job_records_outlive_the_video_jobs_replica(server, s3_client):
    bucket, prefix = server.config.output.removeprefix("s3://").split("/", 1)

    def stored(job_id: str) -> dict[str, Any]:
        key = f"{prefix}/{VIDEO_JOBS_FOLDER}/{job_id}.json"
        return json.loads(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())["job"]

    [replica] = video_jobs_replicas()
    actor = ray.get_actor(replica, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)

    done = poll(server, submit(server, seed=21)["id"], finished)
    assert done["status"] == "succeeded" and stored(done["id"]) == {**done, "url": None}
    running = submit(server, **LONG_JOB, seed=22)
    assert stored(running["id"])["status"] in ("queued", "running")  # stored before the 202
    # Progress reaches storage too, throttled.
    wait_for(lambda: stored(running["id"])["step"] >= 1, 30, "progress stored")

    # A crash, not a shutdown: SIGKILL to the replica's worker process.
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: replica not in video_jobs_replicas(), 30, "the replica is gone")

    # The replacement answers from storage: the finished job as it was, MP4 and all...
    after = poll(server, done["id"], lambda job: True, timeout_s=60)
    print(f"video_jobs answered {time.monotonic() - killed_at:.1f} s after the kill")
    # The same record; its URL freshly presigned (a new expiry), to the same MP4.
    assert {**after, "url": None} == {**done, "url": None}
    assert after["url"].split("?")[0] == done["url"].split("?")[0]
    status, head, _ = call(server, after["url"])
    assert status == 200 and head["content-type"] == "video/mp4"
    # ...and the running one as failed, interrupted, where its stored progress was.
    lost = poll(server, running["id"], finished)
    assert lost["status"] == "failed" and lost["error"].startswith("interrupted"), lost
    assert 1 <= lost["step"] < LONG_JOB["num_inference_steps"] and lost["url"] is None
    assert lost["started_at"] <= lost["finished_at"]
    assert stored(running["id"]) == lost
    status, _, same = call(server, f"/v1/videos/{running['id']}", method="DELETE")
    assert status == 200 and same == lost
    # The replacement runs new jobs.
    job = submit(server, num_inference_steps=1, seed=23)
    assert poll(server, job["id"], finished)["status"] == "succeeded"


def test_job_records_on_s3_outlive_the_replica(s3_bucket, s3_client, storage_config):
    # VideoJobs' class itself, outside Serve (no stages: no job runs), storing on S3.
    output = f"{s3_bucket}/outputs"

    def replica() -> Any:
        return VideoJobs.func_or_class(ServeVideoConfig(), output, storage_config, None, None, None)

    record = VideoJob(
        id=uuid.uuid4().hex, status="running", step=2, num_steps=4, seed=1, created_at=time.time()
    )

    async def restart() -> tuple[Any, ...]:
        await replica()._save(_Job(record))
        later = replica()
        return await later.get(record.id), await later.get(uuid.uuid4().hex), await later.get("..")

    (found, uri), unknown, invalid = asyncio.run(restart())
    assert found.status == "failed" and found.error.startswith("interrupted") and uri is None
    assert found.step == 2 and found.finished_at >= record.created_at
    assert unknown is None and invalid is None
    key = f"outputs/{VIDEO_JOBS_FOLDER}/{record.id}.json"
    body = s3_client.get_object(Bucket=s3_bucket.removeprefix("s3://"), Key=key)["Body"].read()
    assert VideoJob.model_validate(json.loads(body)["job"]) == found


def test_input_images_as_the_ingress_reads_them():
    """The image check beside the server's: a JPEG and a data: URL are read as the PNG is; a
    text-to-video model refuses any image and needs none."""
    image = picture()

    def request(**fields: Any) -> Any:
        from schemas.api import VideoRequest

        return VideoRequest(prompt=PROMPT, **fields)

    read = video_image(request(image=encoded(image)), True, "WanImageToVideoPipeline")
    assert read.mode == "RGB" and np.array_equal(np.asarray(read), np.asarray(image))
    jpeg = video_image(request(image=encoded(image, "JPEG")), True, "WanImageToVideoPipeline")
    assert jpeg.size == image.size
    url = f"data:image/png;base64,{encoded(image)}"
    assert np.array_equal(np.asarray(video_image(request(image=url), True, "x")), read)
    assert video_image(request(), False, "WanPipeline") is None
    with pytest.raises(InvalidInput, match="WanPipeline\\) makes videos from text alone"):
        video_image(request(image=encoded(image)), False, "WanPipeline")


def test_video_config_checks():
    with pytest.raises(ValueError, match="exactly one replica"):
        VideoDeployments.model_validate({"jobs": {"num_replicas": 2}})
    assert ServeConfig().video is None
    assert ServeVideoConfig().bundle.uri.endswith("bundles/t2v")
