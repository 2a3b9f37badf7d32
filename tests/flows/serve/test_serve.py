"""The serving graph on a real local Ray Serve with tiny bundles: parity with diffusers'
pipelines (base alone and base + refiner), the HTTP API (native and OpenAI routes, auth,
validation, prompt filter, watermark, URLs on S3, the server-sent-events progress stream),
batching, overload and timeouts (a timed-out batch stops early), the metrics on Ray's
metrics endpoint, and the `raygen generate` client.

Parity is checked on float32 pixels from the image graph's handle (``ImageGraph`` with
``output_type`` float32: the same stages and code path as the routes, stopping before the
safety stage), because every
image the routes return carries the invisible watermark, which changes pixels on purpose;
the PNGs the routes return are checked against the pipeline's uint8 image to the watermark's
size.
"""

import base64
import io
import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from diffusers import (
    StableDiffusion3Pipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from actors.evaluation import BundleImages, ImageScores
from actors.families import Multiples
from actors.watermark import detect_watermark
from cluster.storage import Storage
from flows.cli import main
from flows.evaluate import prompt_rows, run_evaluate, sampling_kwargs, summarize
from flows.models import build_tiny_bundles
from flows.serve import APP_NAME, api_key_digests, app_builder, deployment_options
from flows.serve.app import check_refiners, shared_text_encoders
from flows.serve.checks import InvalidInput, check_inputs, same_text_encoders
from schemas.api import GenerateRequest, VideoRequest
from schemas.config import (
    ConfigError,
    DeploymentSettings,
    EvaluateConfig,
    ModelRef,
    ServeConfig,
    load_config,
)
from schemas.errors import RaygenError
from tests.conftest import METRICS_REPORT_INTERVAL_MS, free_port
from tests.flows.serve.conftest import (
    API_KEY,
    BLOCKED,
    MAX_ADAPTER_SETS,
    MAX_SEQUENCE_LENGTH,
    RETRY_AFTER_S,
    SECOND_KEY,
    Adapters,
    Server,
)

WRONG_KEY = "rk-test-wrong-0f3d61"

HEIGHT, WIDTH = 32, 48
NUM_STEPS = 6
DENOISING_END = 0.8
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]
PROMPT = "two dogs running on the beach at sunset"
NEGATIVE_PROMPT = "blurry dark photo"


def call(
    server: Server,
    path: str,
    body: dict[str, Any] | None = None,
    key: str | None = API_KEY,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or raw bytes) of a GET (no body) or POST."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, head, payload = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        status, head, payload = err.code, dict(err.headers), err.read()
    if head.get("content-type", "").startswith("application/json"):
        return status, head, json.loads(payload)
    return status, head, payload


def generate(server: Server, **fields: Any) -> dict[str, Any]:
    body = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": NUM_STEPS, **fields}
    status, _, payload = call(server, "/v1/generate", body)
    assert status == 200, payload
    return payload


def decode_png(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return np.asarray(image)


def stats(server: Server) -> dict[str, Any]:
    status, _, payload = call(server, "/v1/stats")
    assert status == 200, payload
    return payload


def stream(server: Server, **fields: Any) -> tuple[int, Any]:
    """A streaming ``POST /v1/generate``: (200, its events as (event, data) pairs), or
    (status, JSON body) when it is refused before the stream starts."""
    body = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": NUM_STEPS, **fields}
    status, headers, payload = call(server, "/v1/generate", {**body, "stream": True})
    if status != 200:
        return status, payload
    assert headers["content-type"].startswith("text/event-stream")
    events = []
    for block in payload.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
    return status, events


def scrape_metrics() -> dict[str, list[tuple[dict[str, str], float]]]:
    """Ray's metrics endpoint on this node, as Prometheus scrapes it: sample name -> (labels,
    value) of each series, raygen's only."""
    [node] = ray.nodes()
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_raygen_"):
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric_sum(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    """The sum over the series of ``name`` with these labels (every replica, every worker)."""
    return sum(
        value
        for series, value in samples.get(name, [])
        if all(series.get(key) == wanted for key, wanted in labels.items())
    )


def sd3_pipeline(bundle_dir: Path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(bundle_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe: StableDiffusion3Pipeline, seed: int, **kwargs: Any) -> Any:
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        num_inference_steps=NUM_STEPS,
        guidance_scale=3.5,
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        **kwargs,
    ).images


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def staged_pixels(server: Server, seed: int, **fields: Any) -> np.ndarray:
    request = GenerateRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE_PROMPT,
        guidance_scale=3.5,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=NUM_STEPS,
        seed=seed,
        **fields,
    )
    staged = server.graph.remote(request, [seed], "float32").result()
    [image] = staged.value
    assert image.dtype == np.float32 and image.shape == (HEIGHT, WIDTH, 3)
    # Each stage reports its own seconds, in graph order; nothing after the VAE ran.
    stages = ["text_encoder", "base", *(["refiner"] if request.refiner else []), "vae_decode"]
    assert list(staged.seconds) == stages and all(s > 0 for s in staged.seconds.values())
    return image


# ---- parity ---------------------------------------------------------------------------


@pytest.mark.slow
def test_base_only_graph_equals_the_pipeline(server, bundles):
    staged = staged_pixels(server, seed=11)
    pipe = sd3_pipeline(bundles["t2i"])
    reference = pipeline_call(pipe, 11, output_type="np")[0]
    diff = max_abs(staged, reference)
    print(f"base-only parity: max abs float32 pixel diff {diff:.3g}")
    assert diff <= TOLERANCE

    # Over HTTP the same image comes back as a watermarked PNG: the pipeline's uint8 image
    # plus a change of a few levels that the detector reads back.
    payload = generate(
        server, prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, guidance_scale=3.5, seed=11
    )
    assert payload["seed"] == 11 and payload["seeds"] == [11]
    assert payload["nsfw_content_detected"] == [False]
    image = decode_png(base64.b64decode(payload["images"][0]["b64_json"]))
    plain = pipeline_call(pipe, 11, output_type="pil")[0]
    plain = np.asarray(plain)
    assert image.shape == plain.shape == (HEIGHT, WIDTH, 3)
    change = image.astype(np.float64) - plain
    assert 10 * np.log10(255**2 / np.mean(change**2)) > 40  # PSNR in dB
    assert detect_watermark(image, server.config.safety.watermark_key).present
    # A plain diffusers image carries none.
    assert not detect_watermark(plain, server.config.safety.watermark_key).present
    for stage in ("text_encoder", "base", "vae_decode", "safety", "total"):
        assert payload["stage_seconds"][stage] > 0


@pytest.mark.slow
def test_base_then_refiner_equals_the_diffusers_handoff(server, bundles):
    staged = staged_pixels(server, seed=12, refiner=True, denoising_end=DENOISING_END)

    # diffusers' base pipeline interrupted at SDXL's handoff step, its latents continued by
    # the refiner pipeline over the rest of the base schedule (as in test_generation.py).
    base_pipe, refiner_pipe = sd3_pipeline(bundles["t2i"]), sd3_pipeline(bundles["refiner"])
    scheduler = base_pipe.scheduler
    scheduler.set_timesteps(NUM_STEPS)
    num_train_timesteps = scheduler.config.num_train_timesteps
    cutoff = int(round(num_train_timesteps - DENOISING_END * num_train_timesteps))
    handoff = int((scheduler.timesteps >= cutoff).sum())
    assert 0 < handoff < NUM_STEPS

    def stop_at_handoff(pipe, step, timestep, callback_kwargs):
        if step + 1 == handoff:
            pipe._interrupt = True
        return callback_kwargs

    latents = pipeline_call(
        base_pipe, 12, callback_on_step_end=stop_at_handoff, output_type="latent"
    )
    unshifted = np.linspace(scheduler.sigma_max, scheduler.sigma_min, NUM_STEPS)[handoff:]
    reference = pipeline_call(
        refiner_pipe, 12, latents=latents, sigmas=unshifted.tolist(), output_type="np"
    )[0]
    diff = max_abs(staged, reference)
    print(f"base+refiner parity: max abs float32 pixel diff {diff:.3g}")
    assert diff <= TOLERANCE
    assert max_abs(staged, staged_pixels(server, seed=12)) > 0.01  # the refiner mattered


# ---- routes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_model_is_picked_by_model_and_its_refiner_equals_sdxls_recipe(server, bundles):
    """SDXL beside the main SD3 model. At the handle level, its base runs the schedule up to
    ``denoising_end`` and its refiner the rest, with its own text encoder (CLIP-G alone) and
    aesthetic-score time ids, as diffusers' two pipelines do; over HTTP, ``model`` picks it."""
    status, _, listed = call(server, "/v1/models")
    assert status == 200 and listed["object"] == "list"
    assert [(m["id"], m["object"]) for m in listed["data"]] == [
        ("raygen", "model"),
        ("sdxl", "model"),
    ]

    handoff = 0.8
    request = GenerateRequest(
        prompt=PROMPT, negative_prompt="blurry", guidance_scale=5.0, height=HEIGHT,
        width=WIDTH, num_inference_steps=NUM_STEPS, seed=3, model="sdxl", refiner=True,
        denoising_end=handoff,
    )  # fmt: skip
    before = stats(server)
    graph = serve.get_deployment_handle("graph_sdxl", APP_NAME)
    [image] = graph.remote(request, [3], "float32").result().value
    after = stats(server)
    for stage in ("text_encoder", "base", "refiner"):
        assert (
            after["models"]["sdxl"][stage]["requests"] > before["models"]["sdxl"][stage]["requests"]
        ), stage
    assert (
        after["models"]["sdxl"]["refiner"]["encoded"]
        == 1 + (before["models"]["sdxl"]["refiner"]["encoded"])
    )
    assert after["base"]["requests"] == before["base"]["requests"]  # the main model's

    base = StableDiffusionXLPipeline.from_pretrained(bundles["sdxl"])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(bundles["sdxl-refiner"])
    settings = {"prompt": PROMPT, "negative_prompt": "blurry", "guidance_scale": 5.0}
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    latents = base(
        **settings, height=HEIGHT, width=WIDTH, num_inference_steps=NUM_STEPS,
        denoising_end=handoff, output_type="latent", generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    reference = refiner(
        **settings, image=latents, num_inference_steps=NUM_STEPS, denoising_start=handoff,
        output_type="np", generator=torch.Generator().manual_seed(3),
    ).images[0]  # fmt: skip
    diff = max_abs(image, reference)
    print(f"SDXL base+refiner over Serve: max abs float32 pixel diff {diff:.3g}")
    assert diff <= TOLERANCE

    # Streamed over HTTP: the model's name comes back, and the refiner's own encoding is a
    # stage of the stream.
    fields = {"prompt": PROMPT, "seed": 3, "model": "sdxl", "refiner": True}
    status, events = stream(server, **fields)
    assert status == 200, events
    finished = [data["stage"] for event, data in events if data.get("status") == "finished"]
    assert finished == [
        "text_encoder", "refiner_text_encoder", "base", "refiner", "vae_decode", "safety"
    ]  # fmt: skip
    result = events[-1][1]
    assert result["model"] == "sdxl"
    assert result["images"] == generate(server, **fields)["images"]
    assert generate(server, prompt=PROMPT, seed=5)["model"] == "raygen"

    # What the sdxl model does not have here is a 422 naming the field.
    for fields, field, message in (
        ({"model": "sdxl", "loras": [{"name": "style-a"}]}, "loras", "main model 'raygen'"),
        ({"model": "sd15"}, "model", "'raygen', 'sdxl'"),
    ):
        body = {"prompt": "a cat", "height": HEIGHT, "width": WIDTH, **fields}
        status, _, payload = call(server, "/v1/generate", body)
        assert status == 422, payload
        [detail] = payload["detail"]
        assert detail["loc"][-1] == field and message in detail["msg"], detail


@pytest.mark.slow
def test_health_needs_no_key(server):
    status, _, payload = call(server, "/health", key=None)
    assert status == 200 and payload["status"] == "ok"
    assert payload["stages"] == [
        "text_encoder",
        "base",
        "refiner",
        "vae_decode",
        "super_resolution_1",
        "safety",
        "video_jobs",
    ]


@pytest.mark.slow
def test_api_keys_401_403_and_never_logged(server):
    body = {"prompt": "a cat", "height": HEIGHT, "width": WIDTH, "num_inference_steps": 2}
    status, headers, payload = call(server, "/v1/generate", body, key=None)
    assert status == 401 and headers.get("www-authenticate") == "Bearer", payload
    # Auth comes before validation: a caller without a key learns nothing about the body.
    assert call(server, "/v1/generate", {"prompt": ""}, key=None)[0] == 401
    assert call(server, "/v1/generate", body, key=WRONG_KEY)[0] == 403
    assert call(server, "/v1/stats", key=WRONG_KEY)[0] == 403
    assert call(server, "/v1/images/generations", {"prompt": "x"}, key=None)[0] == 401
    assert call(server, "/v1/generate", body, key=SECOND_KEY)[0] == 200

    # Only digests reach the replicas, and no log file under the Ray session holds a key.
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for key in (API_KEY, SECOND_KEY, WRONG_KEY):
                assert key.encode() not in text, f"{key} in {path}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"height": 40}, "height"),  # not a multiple of 16
        ({"width": 80}, "width"),  # above max_width 64
        ({"height": 8}, "height"),  # below the size multiple
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 201}, "num_inference_steps"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"num_images_per_prompt": 3}, "num_images_per_prompt"),  # above the server's 2
        ({"upscale": 2}, "upscale"),  # one stage configured
        ({"model": "sd-unknown"}, "model"),
        ({"denoising_end": 1.0}, "denoising_end"),
        ({"timeout_s": 61}, "timeout_s"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_requests_are_422_naming_the_field(server, body, field):
    full = {"prompt": "a cat", "height": HEIGHT, "width": WIDTH, **body}
    status, _, payload = call(server, "/v1/generate", full)
    assert status == 422, payload
    assert [item["loc"][-1] for item in payload["detail"]] == [field], payload


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"size": "40x32"}, "size"),
        ({"size": "1024x1024"}, "size"),  # above the server's maximum
        ({"size": "big"}, "size"),
        ({"n": 3}, "n"),
        ({"n": 11}, "n"),
        ({"quality": "hd"}, "quality"),
    ],
)
def test_openai_route_422_names_openai_fields(server, body, field):
    full = {"prompt": "a cat", "size": f"{WIDTH}x{HEIGHT}", **body}
    status, _, payload = call(server, "/v1/images/generations", full)
    assert status == 422, payload
    assert [item["loc"][-1] for item in payload["detail"]] == [field], payload


@pytest.mark.slow
def test_blocked_prompt_is_refused_before_any_stage_runs(server):
    before = stats(server)
    status, _, payload = call(
        server, "/v1/generate", {"prompt": "a Forbidden-Fruit tart", "height": 32, "width": 32}
    )
    assert status == 400, payload
    assert payload["detail"]["field"] == "prompt"
    assert BLOCKED in payload["detail"]["reason"]
    status, _, payload = call(
        server, "/v1/images/generations", {"prompt": "FORBIDDEN fruit", "size": "32x32"}
    )
    assert status == 400 and payload["detail"]["code"] == "prompt_blocked"
    after = stats(server)
    for stage in ("text_encoder", "base", "vae_decode", "safety"):
        assert after[stage]["requests"] == before[stage]["requests"], stage


@pytest.mark.slow
def test_a_repeated_prompt_hits_the_embedding_cache(server):
    prompt = f"a lighthouse in a storm {uuid.uuid4().hex[:6]}"
    generate(server, prompt="a warm-up prompt", seed=0)  # caches the empty negative prompt
    first = stats(server)["text_encoder"]
    generate(server, prompt=prompt, seed=1)
    second = stats(server)["text_encoder"]
    # The new prompt ran the encoders; the empty negative prompt was cached.
    assert second["cache_misses"] == first["cache_misses"] + 1
    generate(server, prompt=prompt, seed=2)
    third = stats(server)["text_encoder"]
    assert third["cache_misses"] == second["cache_misses"]
    assert third["cache_hits"] == second["cache_hits"] + 2  # the prompt and the negative


@pytest.mark.slow
def test_refiner_and_super_resolution_stages(server):
    payload = generate(server, prompt="a red barn", seed=3, refiner=True, upscale=1)
    image = decode_png(base64.b64decode(payload["images"][0]["b64_json"]))
    assert image.shape == (HEIGHT * 4, WIDTH * 4, 3)
    assert detect_watermark(image, server.config.safety.watermark_key).present
    assert set(payload["stage_seconds"]) >= {"refiner", "super_resolution_1"}


@pytest.mark.slow
def test_concurrent_requests_batch_and_overflow_is_503_with_retry_after(server):
    before = stats(server)
    # The largest, longest request the server takes: the base holds each batch for seconds,
    # so the ten arrive while the first four still hold its slots, however the ingress
    # replicas stagger them.
    body = {
        "prompt": "a crowded market",
        "height": 64,
        "width": 64,
        "num_inference_steps": 200,
        "seed": 0,
    }
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: call(server, "/v1/generate", body), range(10)))
    statuses = sorted(status for status, _, _ in results)
    assert 200 in statuses and 503 in statuses, (statuses, before, stats(server))
    assert set(statuses) == {200, 503}, statuses
    for status, headers, _ in results:
        if status == 503:
            assert headers.get("retry-after") == str(RETRY_AFTER_S)
    # Concurrent requests of one shape and step count shared a denoise call (counted here,
    # not by earlier tests).
    after = stats(server)["base"]["batch_sizes"]  # JSON keys are strings
    assert after.get("2", 0) - before["base"]["batch_sizes"].get("2", 0) >= 1, (before, after)


@pytest.mark.slow
def test_a_streamed_request_reports_stages_and_steps_then_the_same_response(server):
    fields = {"prompt": "a paper boat on a pond", "seed": 21}
    status, events = stream(server, **fields)
    assert status == 200, events

    def label(event: str, data: dict[str, Any]) -> str:
        if event == "stage":
            assert ("seconds" in data) == (data["status"] == "finished"), data
            return f"{data['stage']} {data['status']}"
        if event == "step":
            return f"{data['stage']} step {data['step']}/{data['num_steps']}"
        return event

    stages = ("text_encoder", "base", "vae_decode", "safety")
    expected = [f"{stage} {status}" for stage in stages for status in ("started", "finished")]
    steps = [f"base step {step}/{NUM_STEPS}" for step in range(1, NUM_STEPS + 1)]
    expected[3:3] = steps  # between the base's start and finish
    assert [label(*event) for event in events] == [*expected, "result"]

    # The last event is what the route answers without stream: the same image, bit for bit.
    result = events[-1][1]
    plain = generate(server, **fields)
    assert set(result) == set(plain) and set(result["stage_seconds"]) == set(plain["stage_seconds"])
    assert result["seeds"] == plain["seeds"] == [21]
    assert result["images"] == plain["images"]


@pytest.mark.slow
def test_a_stream_is_refused_as_usual_before_it_starts_and_ends_with_an_error_event(server):
    status, payload = stream(server, prompt="a paper boat", height=40)
    assert status == 422 and payload["detail"][0]["loc"][-1] == "height", payload
    status, payload = stream(server, prompt="a forbidden fruit pie")
    assert status == 400 and payload["detail"]["code"] == "prompt_blocked", payload

    # Past its time limit, once the stream is under way: the 504 as the last event.
    status, events = stream(
        server, prompt="a slow stream", height=64, width=64, num_inference_steps=200, timeout_s=0.5
    )
    assert status == 200, events
    event, data = events[-1]
    assert event == "error" and data["status"] == 504, events[-3:]
    assert "time limit of 0.5 s" in data["detail"]
    assert "result" not in [event for event, _ in events]


@pytest.mark.slow
def test_stage_seconds_and_request_counts_reach_rays_metrics_endpoint(server):
    before = scrape_metrics()
    generate(server, prompt="a counted request", num_inference_steps=2)
    assert call(server, "/v1/generate", {"prompt": "a cat"}, key=None)[0] == 401

    def counts(samples: dict[str, list[tuple[dict[str, str], float]]]) -> list[float]:
        return [
            metric_sum(samples, "ray_raygen_requests_total", route="/v1/generate", status="200"),
            metric_sum(samples, "ray_raygen_requests_total", route="/v1/generate", status="401"),
            *(
                metric_sum(samples, "ray_raygen_stage_seconds_count", stage=stage)
                for stage in ("text_encoder", "base", "vae_decode", "safety", "total")
            ),
        ]

    # Replicas report their metrics every few seconds (METRICS_REPORT_INTERVAL_MS): a few
    # reports' worth of time.
    deadline = time.monotonic() + 4 * METRICS_REPORT_INTERVAL_MS / 1000 + 10
    while True:
        after = scrape_metrics()
        grown = [new > old for old, new in zip(counts(before), counts(after), strict=True)]
        if all(grown) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(grown), (counts(before), counts(after), sorted(after))
    # Seconds, in cumulative buckets up to +Inf, which holds every observation.
    assert metric_sum(after, "ray_raygen_stage_seconds_sum", stage="base") > 0
    buckets = [
        (float(labels["le"]), value)
        for labels, value in after["ray_raygen_stage_seconds_bucket"]
        if labels["stage"] == "total"
    ]
    bounds = sorted({bound for bound, _ in buckets})
    cumulative = [sum(value for le, value in buckets if le == bound) for bound in bounds]
    assert cumulative == sorted(cumulative) and bounds[-1] == float("inf")
    assert cumulative[-1] == metric_sum(after, "ray_raygen_stage_seconds_count", stage="total")


@pytest.mark.slow
def test_openai_client_b64_json_and_url(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    response = client.images.generate(
        model="raygen",
        prompt="a blue bicycle",
        n=2,
        size=f"{WIDTH}x{HEIGHT}",
        response_format="b64_json",
        extra_body={"num_inference_steps": 3, "seed": 5},
    )
    assert len(response.data) == 2
    images = [decode_png(base64.b64decode(item.b64_json)) for item in response.data]
    for image in images:
        assert image.shape == (HEIGHT, WIDTH, 3)
        assert detect_watermark(image, server.config.safety.watermark_key).present
    assert max_abs(images[0], images[1]) > 0  # seeds 5 and 6
    extra = response.model_extra or {}
    assert extra["seeds"] == [5, 6] and extra["stage_seconds"]["base"] > 0

    # url: the output is on S3, so a presigned URL anyone can GET until it expires.
    response = client.images.generate(
        prompt="a blue bicycle",
        size=f"{WIDTH}x{HEIGHT}",
        response_format="url",
        extra_body={"num_inference_steps": 3, "seed": 5},
    )
    [item] = response.data
    assert item.url.startswith(server.config.storage.endpoint_url)
    assert "Signature" in item.url or "X-Amz-Signature" in item.url
    with urllib.request.urlopen(item.url, timeout=30) as fetched:
        stored = fetched.read()
        assert fetched.headers["Content-Type"] == "image/png"  # a browser shows it
    # Seed 5 ran in a batch of two above and alone here: float sums over a different batch
    # size may round a pixel to the next uint8 level (measured: 1 level, 0.13% of pixels).
    assert max_abs(decode_png(stored), images[0]) <= 1
    # The ingress serves the stored file too (the URL local output gets), no key needed.
    name = item.url.split("?")[0].rsplit("/", 1)[-1]
    status, headers, payload = call(server, f"/v1/files/{name}", key=None)
    assert status == 200 and headers["content-type"] == "image/png" and payload == stored
    assert call(server, "/v1/files/..%2Fsecret.png", key=None)[0] == 404


@pytest.mark.slow
def test_a_request_over_its_time_limit_is_504_and_stops(server):
    before = stats(server)
    body = {
        "prompt": "a slow painting",
        "height": 64,
        "width": 64,
        "num_inference_steps": 200,
        "timeout_s": 0.5,
    }
    status, _, payload = call(server, "/v1/generate", body)
    assert status == 504, payload
    # The next request waits for the base replica to be free, so by the time it returns the
    # timed-out one has left the graph: it never reached the decoder...
    generate(server, prompt="a quick sketch", num_inference_steps=2)
    after = stats(server)
    assert after["vae_decode"]["requests"] == before["vae_decode"]["requests"] + 1
    # ...and its batch stopped between steps once it was cancelled, well before step 200.
    assert after["base"]["stopped"] == before["base"]["stopped"] + 1
    steps = after["base"]["steps"] - before["base"]["steps"] - 2  # less the quick request's
    print(f"the timed-out request's batch stopped after {steps} of 200 steps")
    assert 0 < steps < 200


@pytest.mark.slow
def test_raygen_generate_writes_a_png(server, tmp_path, capsys):
    out = tmp_path / "lighthouse.png"
    argv = [
        "generate", "a lighthouse", "--out", str(out), "--url", server.url,
        "--api-key", API_KEY, "--height", "32", "--width", "48", "--steps", "3", "--seed", "4",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "seed 4" in printed
    image = decode_png(out.read_bytes())
    assert image.shape == (32, 48, 3)
    assert main(["watermark", "detect", str(out)]) == 0
    assert "watermarked" in capsys.readouterr().out

    assert main([*argv[:-2], "--seed", "4", "--api-key", WRONG_KEY]) == 2
    # Ray forwards replica logs to this process's stderr too: keep the client's own lines.
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raygen")]
    assert len(err) == 1 and "403" in err[0] and WRONG_KEY not in err[0]

    # Adapters by name, with a scale or without.
    adapted = tmp_path / "adapted.png"
    assert (
        main([*argv[:3], str(adapted), *argv[4:], "--lora", "style-a:0.7", "--lora", "style-b"])
        == 0
    )
    assert max_abs(decode_png(adapted.read_bytes()), image) > 3
    assert main([*argv, "--lora", "no-such"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("raygen")]
    assert len(err) == 1 and "404" in err[0] and "'no-such'" in err[0], err


# ---- adapters (LoRA multiplexing) -----------------------------------------------------


def lora_pipeline(bundles: dict[str, Path], adapters: Adapters) -> StableDiffusion3Pipeline:
    """diffusers' own way to the same images: every adapter loaded under its name."""
    pipe = sd3_pipeline(bundles["t2i"])
    for name, folder in adapters.local.items():
        if name != "other-base":
            pipe.load_lora_weights(folder, adapter_name=name)
    return pipe


def with_adapters(pipe: StableDiffusion3Pipeline, loras: list[dict[str, Any]], seed: int) -> Any:
    pipe.enable_lora()
    pipe.set_adapters([lora["name"] for lora in loras], [lora["scale"] for lora in loras])
    return pipeline_call(pipe, seed, output_type="np")[0]


def base_stats(server: Server) -> dict[str, Any]:
    return server.graph.stats.remote().result()["base"]


@pytest.mark.slow
def test_adapter_sets_alternating_on_one_replica_each_equal_diffusers(server, bundles, adapters):
    pipe = lora_pipeline(bundles, adapters)
    a = [{"name": "style-a", "scale": 1.0}]
    b = [{"name": "style-b", "scale": 0.6}]
    both = [{"name": "style-b", "scale": 0.5}, {"name": "style-a", "scale": 0.8}]
    images = {}
    for index, loras in enumerate((a, b, a, b, both)):
        staged = staged_pixels(server, seed=21, loras=loras)
        diff = max_abs(staged, with_adapters(pipe, loras, seed=21))
        print(f"adapters {loras}: max abs float32 pixel diff {diff:.3g}")
        assert diff <= TOLERANCE
        images[index] = staged
    assert max_abs(images[0], images[1]) > 0.01  # each its own adapter
    assert max_abs(images[0], staged_pixels(server, seed=21)) > 0.01  # and the plain base
    # The plain request after them is still the plain pipeline's.
    pipe.disable_lora()
    reference = pipeline_call(pipe, 21, output_type="np")[0]
    assert max_abs(staged_pixels(server, seed=21), reference) <= TOLERANCE


@pytest.mark.slow
def test_one_set_more_than_a_replica_holds_evicts_the_least_recent(server, bundles, adapters):
    sets = [[{"name": name, "scale": 1.0}] for name in ("style-a", "style-b", "style-c")]
    assert len(sets) == MAX_ADAPTER_SETS + 1
    loads = base_stats(server)["adapter_loads"]
    for loras in sets:
        generate(server, prompt=PROMPT, seed=5, loras=loras)
    stats = base_stats(server)
    # style-a's set went when style-c's came; the last two stay, loaded once each at most.
    assert stats["adapters"] == ["style-b", "style-c"], stats
    assert loads < stats["adapter_loads"] <= loads + 3
    # Asked for again, style-a is loaded back (style-b, now the least recent, goes), and its
    # image is still diffusers' own.
    staged = staged_pixels(server, seed=22, loras=sets[0])
    pipe = lora_pipeline(bundles, adapters)
    assert max_abs(staged, with_adapters(pipe, sets[0], seed=22)) <= TOLERANCE
    assert base_stats(server)["adapters"] == ["style-a", "style-c"]


@pytest.mark.slow
def test_an_adapter_added_to_the_registry_while_serving_is_used(server, adapters):
    status, _, listed = call(server, "/v1/loras")
    assert status == 200, listed
    names = [lora["name"] for lora in listed["loras"]]
    assert {"style-a", "style-b", "style-c", "other-base"} <= set(names)
    assert adapters.late not in names
    assert all(lora["size_bytes"] > 0 for lora in listed["loras"])

    storage = Storage(server.config.storage)
    storage.upload_dir(
        adapters.local[adapters.late], Storage.join(adapters.registry, adapters.late)
    )
    late = generate(server, prompt=PROMPT, seed=6, loras=[{"name": adapters.late}])
    plain = generate(server, prompt=PROMPT, seed=6)
    image = decode_png(base64.b64decode(late["images"][0]["b64_json"]))
    assert max_abs(image, decode_png(base64.b64decode(plain["images"][0]["b64_json"]))) > 3
    _, _, listed = call(server, "/v1/loras")
    assert adapters.late in [lora["name"] for lora in listed["loras"]]
    # The OpenAI route takes the same field.
    status, _, payload = call(
        server,
        "/v1/images/generations",
        {"prompt": PROMPT, "size": f"{WIDTH}x{HEIGHT}", "num_inference_steps": NUM_STEPS,
         "seed": 6, "loras": [{"name": adapters.late}]},
    )  # fmt: skip
    assert status == 200, payload
    openai_image = decode_png(base64.b64decode(payload["data"][0]["b64_json"]))
    assert max_abs(openai_image, image) <= 1  # the same request, its PNG re-encoded


@pytest.mark.slow
def test_bad_adapters_are_refused_naming_them(server):
    body = {"prompt": PROMPT, "height": HEIGHT, "width": WIDTH, "num_inference_steps": NUM_STEPS}

    status, _, payload = call(server, "/v1/generate", {**body, "loras": [{"name": "no-such"}]})
    assert status == 404 and "'no-such'" in payload["detail"], payload

    status, _, payload = call(server, "/v1/generate", {**body, "loras": [{"name": "other-base"}]})
    assert status == 422, payload
    [error] = payload["detail"]
    assert error["loc"] == ["body", "loras"]
    assert "'other-base'" in error["msg"] and "does not fit" in error["msg"], error

    many = [{"name": f"style-{c}"} for c in "abcde"]  # over max_per_request (4)
    for loras, words in (
        (many, "at most 4 adapters"),
        ([{"name": "style-a"}, {"name": "style-a", "scale": 0.5}], "named twice"),
        ([{"name": "../style-a"}], "pattern"),
        ([{"name": "style-a", "scale": 9}], "less than or equal"),
    ):
        status, _, payload = call(server, "/v1/generate", {**body, "loras": loras})
        assert status == 422, payload
        assert payload["detail"][0]["loc"][:2] == ["body", "loras"], payload
        assert words in payload["detail"][0]["msg"], payload

    # Nothing of the refused adapter stayed: the same replica still serves.
    generate(server, prompt=PROMPT, seed=7, loras=[{"name": "style-a"}])


# ---- building the graph (no Ray needed) ----------------------------------------------


@pytest.mark.parametrize("autoscaled", [False, True])
def test_deployment_options_follow_the_settings(autoscaled):
    settings = DeploymentSettings.model_validate(
        {
            "num_cpus": 0.5,
            "num_gpus": 1,
            "resources": {"node:__internal_head__": 0.01},
            "max_ongoing_requests": 4,
            "max_queued_requests": 10,
            "health_check_period_s": 2,
            **({"autoscaling": {"min_replicas": 0, "max_replicas": 3}} if autoscaled else {}),
        }
    )
    options = deployment_options("base", settings, retry_after_s=7)
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 1,
        "resources": {"node:__internal_head__": 0.01},
    }
    assert options["max_ongoing_requests"] == 4 and options["max_queued_requests"] == 10
    assert options["health_check_period_s"] == 2
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 7}
    if autoscaled:
        assert "num_replicas" not in options
        assert options["autoscaling_config"]["min_replicas"] == 0  # scale to zero
        assert options["autoscaling_config"]["max_replicas"] == 3
    else:
        assert options["num_replicas"] == 1 and "autoscaling_config" not in options


def test_settings_and_keys_are_checked_up_front(monkeypatch):
    with pytest.raises(ValueError, match="exceeds max_ongoing_requests"):
        DeploymentSettings(max_ongoing_requests=2, max_batch_size=4)
    with pytest.raises(ValueError, match="must exceed metrics_interval_s"):
        DeploymentSettings.model_validate(
            {"autoscaling": {"metrics_interval_s": 5, "look_back_period_s": 5}}
        )
    monkeypatch.delenv("RAYGEN_TEST_UNSET_KEYS", raising=False)
    with pytest.raises(ConfigError, match="RAYGEN_TEST_UNSET_KEYS"):
        api_key_digests(ServeConfig(api_keys_env="RAYGEN_TEST_UNSET_KEYS"))
    monkeypatch.setenv("RAYGEN_TEST_UNSET_KEYS", "a, b,")
    assert len(api_key_digests(ServeConfig(api_keys_env="RAYGEN_TEST_UNSET_KEYS"))) == 2


def test_app_builder_takes_a_config_file_and_overrides(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max_height: 512\nrefiner:\n  uri: /models/refiner\n")
    app = app_builder({"config": str(config), "deployments.base.num_gpus": "1"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ConfigError, match="unknown key 'max_heigth'"):
        app_builder({"max_heigth": "5"})


def test_models_with_byte_identical_text_encoders_share_one_stage(tmp_path):
    names = ["t2i", "refiner", "flux", "sdxl", "sdxl-refiner"]
    bundles = build_tiny_bundles(tmp_path / "bundles", names=names)
    # A copy of t2i whose T5 tokenizer differs in one byte, at the same size.
    altered = tmp_path / "altered"
    shutil.copytree(bundles["t2i"], altered)
    vocabulary = altered / "tokenizer_3" / "tokenizer.json"
    data = bytearray(vocabulary.read_bytes())
    data[-2] ^= 1
    vocabulary.write_bytes(bytes(data))
    config = ServeConfig.model_validate(
        {
            "bundle": {"uri": str(bundles["t2i"])},
            "models": [
                {"name": "flux", "bundle": {"uri": str(bundles["flux"])}},
                # The refiner's text encoders and tokenizers are t2i's, file for file.
                {"name": "second", "bundle": {"uri": str(bundles["refiner"])}},
                {"name": "altered", "bundle": {"uri": str(altered)}},
            ],
        }
    )
    assert shared_text_encoders(config) == [None, None, "raygen", None]
    # A refiner reads its base's embeddings where its text encoders are its base's (SD3's
    # tiny refiner); SDXL's refiner encodes with CLIP-G alone, so it holds CLIP-G itself.
    storage = Storage()
    assert same_text_encoders(
        ModelRef(uri=str(bundles["t2i"])), ModelRef(uri=str(bundles["refiner"])), storage
    )
    assert not same_text_encoders(
        ModelRef(uri=str(bundles["sdxl"])), ModelRef(uri=str(bundles["sdxl-refiner"])), storage
    )
    with pytest.raises(ValueError, match="given twice"):
        ServeConfig.model_validate({"models": [{"name": "raygen", "bundle": {"uri": "x"}}]})


def test_a_refiner_of_another_latent_space_is_refused_at_start_up_naming_both(tmp_path):
    bundles = build_tiny_bundles(tmp_path / "bundles", names=["t2i", "refiner", "flux"])
    fine = {"bundle": {"uri": str(bundles["t2i"])}, "refiner": {"uri": str(bundles["refiner"])}}
    check_refiners(ServeConfig.model_validate(fine))
    # Flux's latents: 16 channels at 8x like SD3's, but another family and other factors.
    mixed = {**fine, "refiner": {"uri": str(bundles["flux"])}}
    with pytest.raises(ConfigError, match="^refiner: ") as caught:
        check_refiners(ServeConfig.model_validate(mixed))
    message = str(caught.value)
    assert str(bundles["flux"]) in message and str(bundles["t2i"]) in message
    assert "family flux" in message and "scaling_factor 0.3611" in message
    second = {"models": [{"name": "two", **mixed}]}
    with pytest.raises(ConfigError, match="^models.two.refiner: "):
        check_refiners(ServeConfig.model_validate(second))


def test_check_inputs_names_the_field_for_images_and_videos():
    config = ServeConfig.model_validate(
        {
            "max_height": 64,
            "max_width": 64,
            "max_images_per_request": 2,
            "request_timeout_s": 60,
            "video": {"max_height": 32, "max_width": 32, "max_num_frames": 9},
        }
    )
    image, video = Multiples(latent=8, size=16), Multiples(latent=8, size=16, frames=4)
    check_inputs(GenerateRequest(prompt="a cat", height=32, width=64), config, image)
    check_inputs(VideoRequest(prompt="a cat", height=32, width=16, num_frames=9), config, video)
    cases = [
        (GenerateRequest(prompt="a", height=40, width=32), image, "height", "multiple of 16"),
        (GenerateRequest(prompt="a", height=32, width=80), image, "width", "at most 64"),
        (GenerateRequest(prompt="a", height=32, width=32, num_images_per_prompt=3), image,
         "num_images_per_prompt", "at most 2"),
        (GenerateRequest(prompt="a", height=32, width=32, refiner=True), image, "refiner",
         "no refiner"),
        (GenerateRequest(prompt="a", height=32, width=32, upscale=1), image, "upscale",
         "0 super-resolution"),
        (GenerateRequest(prompt="a", height=32, width=32, model="x"), image, "model", "'raygen'"),
        (GenerateRequest(prompt="a", height=32, width=32, timeout_s=61), image, "timeout_s",
         "at most 60"),
        (VideoRequest(prompt="a", height=48, width=32, num_frames=5), video, "height",
         "at most 32"),
        (VideoRequest(prompt="a", height=32, width=32, num_frames=6), video, "num_frames",
         "multiple of 4"),
        (VideoRequest(prompt="a", height=32, width=32, num_frames=13), video, "num_frames",
         "at most 9"),
    ]  # fmt: skip
    for request, multiples, field, message in cases:
        with pytest.raises(InvalidInput, match=message) as caught:
            check_inputs(request, config, multiples)
        assert caught.value.field == field


@pytest.mark.slow
def test_evaluate_through_the_server_scores_each_image_as_from_the_bundle(
    server, bundles, monkeypatch, tmp_path
):
    """`raygen evaluate --url`: the same (prompt, seed) rows through POST /v1/generate give
    the bundle's own images (plus the watermark) and so the same scores. The bundle's side is
    `raygen evaluate`'s two stages called here, in this process: their Ray Data run is
    test_evaluate's, and a second one would only add a pipeline's start to the suite."""
    prompts = ["a red circle on the left", "a blue square at the top", "a lighthouse"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    monkeypatch.setenv("RAYGEN_API_KEY", API_KEY)
    values = {
        "prompts": str(tmp_path / "prompts.txt"), "seeds": 2, "height": 32, "width": 32,
        "num_inference_steps": 2, "guidance_scale": 3.5,
        "max_sequence_length": MAX_SEQUENCE_LENGTH, "metrics": ["prompt_following"],
        # The server's dozen replicas hold most of the 2 CPUs.
        "generate.batch_size": 3, "generate.num_cpus": 0.2,
        "url": server.url, "output": str(tmp_path / "served"),
    }  # fmt: skip
    config = load_config(EvaluateConfig, values=values)
    served = run_evaluate(config)

    rows = prompt_rows(prompts, config.seeds)
    batch = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    images = BundleImages(
        ModelRef(uri=str(bundles["t2i"])), config.storage, **sampling_kwargs(config),
        max_sequence_length=config.max_sequence_length,
    )(batch)  # fmt: skip
    scores = ImageScores(clip=None, storage=config.storage)(images)
    from_bundle = [{key: value[i] for key, value in scores.items()} for i in range(len(rows))]
    assert served["url"] == server.url and served["metrics"] == summarize(from_bundle)
    for ours, theirs in zip(from_bundle, served["images"], strict=True):
        assert (ours["prompt"], ours["seed"]) == (theirs["prompt"], theirs["seed"])
        assert all(theirs[c] == ours[c] for c in ImageScores.CATEGORIES if c in theirs)
        assert all(theirs[f"seen_{c}"] == ours[f"seen_{c}"] for c in ImageScores.CATEGORIES)
        plain = np.asarray(Image.open(io.BytesIO(ours["image"]))).astype(float)
        marked = np.asarray(Image.open(tmp_path / "served" / theirs["file"])).astype(float)
        assert 10 * np.log10(255**2 / np.mean((marked - plain) ** 2)) > 40  # PSNR in dB
        assert detect_watermark(marked.astype(np.uint8), server.config.safety.watermark_key).present


def test_evaluate_names_a_server_that_is_down_within_seconds(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    config = load_config(EvaluateConfig, values={"url": url, "output": str(tmp_path / "eval")})
    started = time.monotonic()
    with pytest.raises(RaygenError, match=f"url: cannot reach a raygen server at {url}"):
        run_evaluate(config)
    assert time.monotonic() - started < 10
