"""Benchmark: the `raygen serve` graph against one diffusers pipeline per Serve replica.

Closed-loop load over HTTP: N client threads, each sending its next ``POST /v1/generate`` as
soon as the previous one returns, at N = 1, 4, 8 and 16, against

- **graph**: ``flows.serve.build_app`` (ingress -> text_encoder -> base -> vae_decode ->
  safety, each its own deployment; the text encoders and the base DiT batch concurrent
  requests with ``@serve.batch``);
- **baseline**: what users build today after Ray's Stable Diffusion example: a FastAPI
  ingress deployment and a deployment holding a ``StableDiffusion3Pipeline.from_pretrained``
  of the same bundle, one request per pipeline call, no stage split, no batching. It runs with
  one replica (torch on 2 threads) and with two (1 thread each); the better one at N=8 is
  the baseline the target compares against, and both are reported.

Both run one after the other in one local Ray of 2 CPUs, with the same client, the same
request settings (steps, size, guidance, T5 length), the same prompts (distinct, so the
graph's embedding cache never hits a prompt; only the shared empty negative prompt hits), and
the same seeds. The bundle is the tiny t2i one with a larger ``SD3Transformer2DModel`` (built
here from a config with seeded weights; its size goes into the JSON) so that denoising
dominates a request.

    python -m benchmarks.serve            # about 11 minutes on 2 cores
    python -m benchmarks.serve --quick    # smoke run: 1.1M-param model, N = 1 and 8; ~2 min
    python -m benchmarks.serve --levels 8 --set deployments.base.batch_wait_timeout_s=1.0

Reported (printed, and as JSON at ``--out``): per contender and N, throughput (requests/s)
and p50/p95 latency of the measured requests (warm-up discarded); the graph's throughput
ratio and p95 ratio against the best baseline (target at N=8: >= 1.5x throughput, p95 no
worse); the base's batch sizes at each N; and the graph's added latency per hop at N=1,
measured two ways (see ``hop_latency``).
"""

import argparse
import base64
import io
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
from diffusers import StableDiffusion3Pipeline
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from benchmarks.prep import NOISY_OTHERS, quiet_model_logs, wait_for_quiet
from benchmarks.train import build_bundle
from cluster.ray_runtime import init_ray
from flows.models import CAPTION_WORDS, build_tiny_bundles
from flows.serve import build_app
from schemas.api import GeneratedImage, GenerateRequest, GenerateResponse
from schemas.config import RayConfig, ServeConfig, load_config

NUM_CPUS = 2  # the local Ray both contenders run on; the machine has 2 cores
TARGET_LEVEL, TARGET_RATIO = 8, 1.5
APP_NAME = "bench"
# The machine is shared: before each level wait (a while, not forever) for other tenants to
# go quiet, and flag levels during which they took more than NOISY_OTHERS of the cores.
QUIET_MAX_WAIT_S = 60.0
# The base transformer: SD3's MMDiT at 8 layers of 10 heads of 32 (width 320), 28.8M params,
# so that denoising is most of a request (the JSON's denoise_share_of_stage_work).
TRANSFORMER_LAYERS, TRANSFORMER_HEADS = 8, 10
# T5 tokens per prompt, on both sides (ServeConfig.max_sequence_length, the pipeline's
# max_sequence_length): 77 CLIP + 77 T5 positions of text per image.
MAX_SEQUENCE_LENGTH = 77
# The handle calls each contender's ingress makes per request: the key its response's
# stage_seconds times the call under (also the deployment's name) -> the method called. With
# the HTTP proxy -> ingress hop in front, the graph has five hops and the baseline two.
GRAPH_STAGES = {
    "text_encoder": "encode",
    "base": "denoise",
    "vae_decode": "decode",
    "safety": "finish",
}
BASELINE_STAGES = {"pipeline": "generate"}

# What a user serving this model on a 2-core machine would write. The base DiT reserves both
# CPUs, so Ray gives its replica OMP_NUM_THREADS=2 (torch on 2 threads, as the 1-replica
# baseline); the other stages are light (tiny text encoders and VAE, a PNG) and reserve none
# (Ray gives them 1 thread each), so the graph reserves the same 2 CPUs as the baseline. The
# base batches up to 8 requests; it waits up to 50 ms for a batch to fill, small next to a
# batch's seconds of denoising, so that clients returning a few ms apart land in one batch.
# (Ray 2.60's @serve.batch forms a batch within that wait of its first request even while
# the previous batch still runs, so under load batches stay small; --set
# deployments.base.batch_wait_timeout_s=1.0 shows what full batches give.)
GRAPH_SETTINGS: dict[str, Any] = {
    "deployments.ingress.num_cpus": 0,
    "deployments.ingress.max_ongoing_requests": 32,
    "deployments.text_encoder.num_cpus": 0,
    "deployments.text_encoder.max_ongoing_requests": 16,
    "deployments.text_encoder.max_batch_size": 8,
    "deployments.text_encoder.batch_wait_timeout_s": 0.01,
    "deployments.base.num_replicas": 1,
    "deployments.base.num_cpus": NUM_CPUS,
    "deployments.base.max_ongoing_requests": 8,
    "deployments.base.max_batch_size": 8,
    "deployments.base.batch_wait_timeout_s": 0.05,
    "deployments.vae_decode.num_cpus": 0,
    "deployments.vae_decode.max_ongoing_requests": 16,
    "deployments.safety.num_cpus": 0,
    "deployments.safety.max_ongoing_requests": 16,
}


# ---------------------------------------------------------------------------------------
# The baseline: Ray's Stable Diffusion example, for an SD3 bundle
# ---------------------------------------------------------------------------------------

baseline_api = FastAPI(title="diffusers on Ray Serve")


@serve.deployment
class DiffusersPipeline:
    """One ``StableDiffusion3Pipeline`` per replica; one request per call."""

    def __init__(self, bundle: str, max_sequence_length: int) -> None:
        self.pipe = StableDiffusion3Pipeline.from_pretrained(bundle)
        self.pipe.set_progress_bar_config(disable=True)
        self.max_sequence_length = max_sequence_length
        # Serve runs sync methods in a thread pool, and the pipeline keeps per-call state on
        # itself (scheduler, guidance): one call at a time.
        self.lock = threading.Lock()

    def generate(self, body: GenerateRequest) -> bytes:
        """The PNG."""
        with self.lock:
            image = self.pipe(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                num_inference_steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
                height=body.height,
                width=body.width,
                generator=torch.Generator().manual_seed(body.seed),
                max_sequence_length=self.max_sequence_length,
            ).images[0]
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    def threads(self) -> int:
        return torch.get_num_threads()


@serve.deployment
@serve.ingress(baseline_api)
class BaselineIngress:
    def __init__(self, pipeline: DeploymentHandle) -> None:
        self.pipeline = pipeline

    @baseline_api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        # Timed as the graph's ingress times its stages: the wait on the handle call.
        start = time.perf_counter()
        png = await self.pipeline.generate.remote(body)
        seconds = time.perf_counter() - start
        return GenerateResponse(
            images=[GeneratedImage(b64_json=base64.b64encode(png).decode())],
            seed=body.seed,
            seeds=[body.seed],
            model="diffusers",
            nsfw_content_detected=[False],
            stage_seconds={"pipeline": seconds, "total": seconds},
        )


def baseline_app(bundle: Path, num_replicas: int, max_sequence_length: int) -> serve.Application:
    """The pipeline deployment reserves all CPUs, split over its replicas: Ray sets each
    replica's OMP_NUM_THREADS (torch's threads) to its share."""
    pipeline = DiffusersPipeline.options(
        name="pipeline",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": NUM_CPUS / num_replicas},
        # One running and one waiting at the replica, so it never idles between requests.
        max_ongoing_requests=2,
    ).bind(str(bundle), max_sequence_length)
    return BaselineIngress.options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32
    ).bind(pipeline)


@serve.deployment
class ThreadProbe:
    """torch's intra-op threads in a replica that reserves a given number of CPUs."""

    def threads(self) -> dict[str, Any]:
        return {
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }


def replica_threads(num_cpus: float) -> dict[str, Any]:
    handle = serve.run(
        ThreadProbe.options(ray_actor_options={"num_cpus": num_cpus}).bind(),
        name="probe",
        route_prefix=None,
    )
    threads = handle.threads.remote().result()
    serve.delete("probe")
    return threads


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------


def distinct_prompts(seed: int) -> Iterator[str]:
    """Caption-like prompts, none repeated."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    while True:
        prompt = " ".join(rng.choice(CAPTION_WORDS, 8))
        if prompt not in seen:
            seen.add(prompt)
            yield prompt


def requests(workload: dict[str, Any], seed: int = 0) -> Iterator[GenerateRequest]:
    """The request stream every contender gets: distinct prompts, seeds 0, 1, 2, ..."""
    for index, prompt in enumerate(distinct_prompts(seed)):
        yield GenerateRequest(prompt=prompt, seed=index, **workload)


def post_generate(url: str, body: GenerateRequest, request_id: str) -> GenerateResponse:
    """``POST /v1/generate``, tagged with our request id: Serve's proxy adopts it, and every
    access log line the request leaves (ingress and each stage) carries it."""
    call = urllib.request.Request(
        f"{url}/v1/generate",
        data=body.model_dump_json(exclude_none=True).encode(),
        headers={"Content-Type": "application/json", "X-Request-ID": request_id},
        method="POST",
    )
    with urllib.request.urlopen(call, timeout=600) as response:
        return GenerateResponse.model_validate_json(response.read())


def closed_loop(
    url: str, bodies: Iterator[GenerateRequest], concurrency: int, num_measured: int
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request as soon as the previous one
    returns. Each client's first request is warm-up. The window opens when every client has
    finished its warm-up and closes when ``num_measured`` requests sent inside it have
    returned; clients keep the load on until then.

    Throughput counts every response that arrived in the window; latencies are those of the
    requests sent and answered inside it."""
    lock = threading.Lock()
    stop = threading.Event()
    window: dict[str, float] = {}
    warmed = 0
    ends: list[float] = []
    measured: list[dict[str, Any]] = []

    def client() -> None:
        nonlocal warmed
        first = True
        while not stop.is_set():
            with lock:
                body = next(bodies)
            request_id = uuid.uuid4().hex
            start = time.perf_counter()
            response = post_generate(url, body, request_id)
            end = time.perf_counter()
            with lock:
                ends.append(end)
                if first:
                    warmed += 1
                    if warmed == concurrency:
                        window["start"] = end
                elif "start" in window and start >= window["start"] and not stop.is_set():
                    measured.append(
                        {
                            "request_id": request_id,
                            "latency_s": end - start,
                            "stage_seconds": response.stage_seconds,
                        }
                    )
                    if len(measured) == num_measured:
                        window["end"] = end
                        stop.set()
            first = False

    def guarded() -> None:
        try:
            client()
        finally:  # one failed client stops the others
            stop.set()

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(guarded) for _ in range(concurrency)]:
            future.result()
    span = window["end"] - window["start"]
    latencies = [record["latency_s"] for record in measured]
    return {
        "concurrency": concurrency,
        "num_measured": len(measured),
        "window_s": span,
        "throughput_rps": sum(window["start"] < end <= window["end"] for end in ends) / span,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "mean_s": statistics.fmean(latencies),
        "latencies_s": latencies,
        "stage_seconds_median": {
            stage: statistics.median(record["stage_seconds"][stage] for record in measured)
            for stage in measured[0]["stage_seconds"]
        },
        "requests": measured,
    }


@contextmanager
def cpu_use() -> Iterator[dict[str, float]]:
    """The busy fraction of all cores while the block runs: of the machine (/proc/stat), of
    this process tree (the driver, Ray and every replica), and the difference, which is
    other tenants' load (the machine is shared)."""
    cores = psutil.cpu_count()
    machine_before, tree_before = psutil.cpu_times(), tree_cpu_s()
    start = time.perf_counter()
    use: dict[str, float] = {}
    yield use
    wall = time.perf_counter() - start
    machine_after, tree_after = psutil.cpu_times(), tree_cpu_s()
    idle = (machine_after.idle + machine_after.iowait) - (
        machine_before.idle + machine_before.iowait
    )
    machine = 1 - idle / (sum(machine_after) - sum(machine_before))
    tree = sum(s - tree_before.get(pid, 0.0) for pid, s in tree_after.items()) / (wall * cores)
    use.update(machine_util=machine, tree_util=tree, others_util=max(0.0, machine - tree))


def tree_cpu_s() -> dict[int, float]:
    """CPU seconds so far of this process and each of its descendants, by pid."""
    seconds = {}
    root = psutil.Process()
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # gone since it was listed
            continue
        seconds[process.pid] = times.user + times.system
    return seconds


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def run_contender(
    name: str,
    app: serve.Application,
    url: str,
    stages: dict[str, str],
    workload: dict[str, Any],
    num_measured: dict[int, int],
    logs: Path,
) -> dict[str, Any]:
    """Deploy ``app``, load it at each level, tear it down; after concurrency 1, the time
    each hop added to its requests (``hops``)."""
    graph = "base" in stages
    start = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"logs_dir": str(logs)})
    result: dict[str, Any] = {"name": name, "deploy_s": time.perf_counter() - start, "levels": {}}
    if not graph:
        pipeline = serve.get_deployment_handle("pipeline", APP_NAME)
        result["pipeline_torch_threads"] = pipeline.threads.remote().result()
    bodies = requests(workload)
    for level, count in num_measured.items():
        busy_before = wait_for_quiet(QUIET_MAX_WAIT_S)
        before = get_json(f"{url}/v1/stats") if graph else None
        with cpu_use() as cpu:
            measured = closed_loop(url, bodies, level, count)
        measured["cpu"] = {"machine_busy_before": busy_before, **cpu}
        measured["noisy"] = cpu["others_util"] > NOISY_OTHERS
        if graph:
            after = get_json(f"{url}/v1/stats")
            batches = Counter({int(k): v for k, v in after["base"]["batch_sizes"].items()})
            batches -= Counter({int(k): v for k, v in before["base"]["batch_sizes"].items()})
            measured["base_batch_sizes"] = dict(sorted(batches.items()))
            measured["text_encoder_cache"] = {
                key: after["text_encoder"][key] - before["text_encoder"][key]
                for key in ("cache_hits", "cache_misses")
            }
        records = measured.pop("requests")
        if level == 1:
            ids = [record["request_id"] for record in records]
            result["hops_c1"] = hops(records, replica_seconds(logs, stages, ids), stages)
        result["levels"][level] = measured
        print(f"  {name} c={level}: {brief(measured)}", flush=True)
    serve.delete(APP_NAME)
    return result


# An access log line of a Serve replica (text encoding): level, date, time, "<app>_<deployment>",
# replica id, request id, "--", then "<what> <status> <latency>ms".
_ACCESS_LINE = re.compile(
    r"^\S+ \S+ \S+ (?P<deployment>\S+) \S+ (?P<request_id>\S+) -- "
    r"(?P<what>.+) (?P<status>\S+) (?P<ms>[0-9.]+)ms$",
    re.MULTILINE,
)


def replica_seconds(
    logs: Path, stages: dict[str, str], request_ids: list[str], timeout_s: float = 30.0
) -> dict[str, dict[str, float]]:
    """Request id -> deployment -> seconds the request spent inside that deployment's
    replica (Serve's own measure, from the call's arrival at the replica to its result),
    from the access logs: the ingress's ``POST /v1/generate`` and each stage's method. A
    replica writes its line after it answered, so this waits for the lines of every request
    in ``request_ids``."""
    calls = {"ingress": "POST /v1/generate", **{s: f"CALL {m}" for s, m in stages.items()}}
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[str, dict[str, float]] = {}
        for path in logs.glob(f"replica_{APP_NAME}_*.log"):
            for line in _ACCESS_LINE.finditer(path.read_text()):
                deployment = line["deployment"].removeprefix(f"{APP_NAME}_")
                if calls.get(deployment) == line["what"] and line["status"] in ("200", "OK"):
                    found.setdefault(line["request_id"], {})[deployment] = float(line["ms"]) / 1000
        missing = [i for i in request_ids if len(found.get(i, {})) < len(calls)]
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"no Serve access log lines for {missing} under {logs}")
        time.sleep(0.5)


def hops(
    records: list[dict[str, Any]],
    inside: dict[str, dict[str, float]],
    stages: dict[str, str],
) -> dict[str, Any]:
    """What each hop added to each measured request, then the median over requests: the
    front hop (HTTP proxy -> ingress and back) is the client's latency minus the ingress
    replica's time; a stage's hop is the ingress's wait on its handle call (the response's
    ``stage_seconds``) minus the stage replica's time for that call. What is left is Serve's
    routing, (de)serialisation and the object transfers; a batch's wait for more requests
    happens inside the replica, so it is not hop time (it is in ``replica_s``)."""
    per_request: dict[str, list[float]] = {"ingress": [], **{stage: [] for stage in stages}}
    replica: dict[str, list[float]] = {name: [] for name in per_request}
    for record in records:
        times = inside[record["request_id"]]
        per_request["ingress"].append(record["latency_s"] - times["ingress"])
        replica["ingress"].append(times["ingress"])
        for stage in stages:
            per_request[stage].append(record["stage_seconds"][stage] - times[stage])
            replica[stage].append(times[stage])
    return {
        "per_hop_s": {name: statistics.median(v) for name, v in per_request.items()},
        "replica_s": {name: statistics.median(v) for name, v in replica.items()},
        "num_requests": len(records),
    }


def brief(level: dict[str, Any]) -> str:
    return (
        f"{level['throughput_rps']:.3f} req/s, p50 {level['p50_s']:.3f} s, "
        f"p95 {level['p95_s']:.3f} s (n={level['num_measured']})"
    )


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, short")
    parser.add_argument(
        "--levels",
        type=lambda text: [int(level) for level in text.split(",")],
        default=None,
        help="concurrency levels, comma-separated (default 1,4,8,16; --quick: 1,8)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="a ServeConfig override for the graph, key.path=value (repeatable)",
    )
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_model_logs()
    # Requests measured at each concurrency (after each client's warm-up request).
    if args.quick:
        layers, heads = 2, 4
        levels = args.levels or [1, 8]
        num_measured = {level: 2 * level + 2 for level in levels}
        workload = {"num_inference_steps": 2, "height": 64, "width": 64}
    else:
        layers, heads = TRANSFORMER_LAYERS, TRANSFORMER_HEADS
        levels = args.levels or [1, 4, 8, 16]
        # At least 24 for a p95, and 4 rounds of the clients.
        num_measured = {level: max(24, 4 * level) for level in levels}
        workload = {"num_inference_steps": 6, "height": 128, "width": 128}
    workload |= {"guidance_scale": 5.0}
    work = Path(tempfile.mkdtemp(prefix="raygen-bench-serve-"))
    tiny = build_tiny_bundles(work / "tiny", names=["t2i"])
    bundle, num_params = build_bundle(work, tiny["t2i"], layers, heads, seed=0)

    # Serve's logs go to files only (the access logs are read back for the hop times), not
    # through every replica's stderr to this console. Replicas inherit the variable.
    os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"
    init_ray(RayConfig(num_cpus=NUM_CPUS))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    threads = {str(cpus): replica_threads(cpus) for cpus in (0, 1, NUM_CPUS)}

    config = load_config(
        ServeConfig,
        overrides=args.overrides,
        values={
            "bundle.uri": str(bundle),
            "output": str(work / "outputs"),
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            **GRAPH_SETTINGS,
        },
    )
    contenders = {}
    for replicas in (1, 2):
        name = f"baseline_{replicas}x{NUM_CPUS // replicas}cpu"
        app = baseline_app(bundle, replicas, MAX_SEQUENCE_LENGTH)
        contenders[name] = run_contender(
            name, app, url, BASELINE_STAGES, workload, num_measured, work / "logs" / name
        )
    contenders["graph"] = run_contender(
        "graph",
        build_app(config),
        url,
        GRAPH_STAGES,
        workload,
        num_measured,
        work / "logs" / "graph",
    )
    serve.shutdown()
    ray.shutdown()

    baselines = [name for name in contenders if name.startswith("baseline")]
    top = TARGET_LEVEL if TARGET_LEVEL in levels else levels[-1]
    best = max(baselines, key=lambda name: contenders[name]["levels"][top]["throughput_rps"])
    graph = contenders["graph"]["levels"]
    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "model": {
            "class": "SD3Transformer2DModel",
            "params": num_params,
            "layers": layers,
            "heads": heads,
            "attention_head_dim": 32,
            "text_encoders": "the tiny t2i bundle's CLIP-L, CLIP-G and T5 shapes",
        },
        "workload": {**workload, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "ray_num_cpus": NUM_CPUS,
        "replica_threads_by_num_cpus": threads,
        "graph_settings": {
            stage: getattr(config.deployments, stage).model_dump(exclude_none=True)
            for stage in ("ingress", *GRAPH_STAGES)
        },
        "graph_overrides": args.overrides,
        "baseline_settings": {
            "pipeline": "StableDiffusion3Pipeline.from_pretrained, one request per call",
            "replicas_tried": [1, 2],
            "num_cpus_per_replica": "2 / replicas (torch threads = that)",
            "max_ongoing_requests": 2,
            "ingress_num_cpus": 0,
        },
        "levels": list(levels),
        "num_measured": num_measured,
        "contenders": contenders,
        "best_baseline": best,
        "best_baseline_chosen_at": top,
        "ratios": {
            level: {
                "throughput": graph[level]["throughput_rps"]
                / contenders[best]["levels"][level]["throughput_rps"],
                "p95": graph[level]["p95_s"] / contenders[best]["levels"][level]["p95_s"],
            }
            for level in levels
        },
        "hop_latency": hop_latency(contenders, config) if 1 in levels else None,
    }
    summary["noisy_levels"] = [
        f"{name} c={level}"
        for name, contender in contenders.items()
        for level, result in contender["levels"].items()
        if result["noisy"]
    ]
    ratio = summary["ratios"][top]
    summary["target"] = {
        "level": top,
        "throughput_ratio": ratio["throughput"],
        "p95_ratio": ratio["p95"],
        "met": ratio["throughput"] >= TARGET_RATIO and ratio["p95"] <= 1.0,
    }
    print(report(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def hop_latency(contenders: dict[str, Any], config: ServeConfig) -> dict[str, Any]:
    """The graph's added latency per hop at concurrency 1, two ways: per hop from the
    responses' stage timings and Serve's access logs (``hops``), and end to end against the
    1-replica baseline (torch on the same 2 threads as the graph's base): the difference of
    their p50 latencies over the graph's extra hops. The second also counts what the split
    adds beside hops: the batch waits at c=1 (up to ``batch_wait_timeout_s`` each in
    text_encoder and base), the watermark, and the text encoders and VAE on one thread."""
    graph = contenders["graph"]
    baseline_name = next(name for name in contenders if name.startswith("baseline_1x"))
    baseline = contenders[baseline_name]
    graph_hops = graph["hops_c1"]["per_hop_s"]
    baseline_hops = baseline["hops_c1"]["per_hop_s"]
    extra = len(graph_hops) - len(baseline_hops)
    difference = graph["levels"][1]["p50_s"] - baseline["levels"][1]["p50_s"]
    # At c=1 every batch waits its full batch_wait_timeout_s for company that never comes.
    waits = {
        stage: getattr(config.deployments, stage).batch_wait_timeout_s
        for stage in ("text_encoder", "base")
    }
    work = {
        stage: seconds - waits.get(stage, 0.0)
        for stage, seconds in graph["hops_c1"]["replica_s"].items()
        if stage != "ingress"
    }
    return {
        "graph_batch_waits_s": waits,
        "denoise_share_of_stage_work": work["base"] / sum(work.values()),
        "graph_per_hop_s": graph_hops,
        "graph_mean_per_hop_s": statistics.fmean(graph_hops.values()),
        "graph_hops_total_s": sum(graph_hops.values()),
        "baseline": baseline_name,
        "baseline_per_hop_s": baseline_hops,
        "graph_p50_minus_baseline_p50_s": difference,
        "extra_hops": extra,
        "end_to_end_per_extra_hop_s": difference / extra,
        "graph_replica_s": graph["hops_c1"]["replica_s"],
        "baseline_replica_s": baseline["hops_c1"]["replica_s"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(s: dict[str, Any]) -> str:
    model, w = s["model"], s["workload"]
    lines = [
        f"model: SD3Transformer2DModel {model['params'] / 1e6:.1f}M params ({model['layers']} "
        f"layers, {model['heads']} heads of 32); {w['height']}x{w['width']} px, "
        f"{w['num_inference_steps']} steps, guidance {w['guidance_scale']}, T5 "
        f"{w['max_sequence_length']} tokens; Ray {s['ray_num_cpus']} CPUs",
        "",
        f"{'contender':<22} {'c':>3} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'n':>4}  others' CPU",
    ]
    for name, contender in s["contenders"].items():
        for level, r in contender["levels"].items():
            lines.append(
                f"{name:<22} {level:>3} {r['throughput_rps']:>8.3f} {r['p50_s']:>8.3f} "
                f"{r['p95_s']:>8.3f} {r['num_measured']:>4}  {r['cpu']['others_util']:.0%}"
                + (" NOISY" if r["noisy"] else "")
            )
    lines.append("")
    lines.append(
        f"graph / best baseline ({s['best_baseline']}, best at c={s['best_baseline_chosen_at']}):"
    )
    for level, ratio in s["ratios"].items():
        batches = s["contenders"]["graph"]["levels"][level]["base_batch_sizes"]
        lines.append(
            f"  c={level}: throughput {ratio['throughput']:.2f}x, p95 {ratio['p95']:.2f}x; "
            f"base batch sizes {batches}"
        )
    hop = s["hop_latency"]
    if hop is not None:
        lines.append(
            "added latency per hop at c=1 (graph): "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in hop["graph_per_hop_s"].items())
            + f"; mean {hop['graph_mean_per_hop_s'] * 1000:.1f} ms; batch waits "
            + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in hop["graph_batch_waits_s"].items())
        )
        lines.append(
            "  baseline's hops: "
            + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in hop["baseline_per_hop_s"].items())
            + f"; graph p50 - {hop['baseline']} p50 = "
            f"{hop['graph_p50_minus_baseline_p50_s'] * 1000:.0f} ms over {hop['extra_hops']} "
            f"extra hops = {hop['end_to_end_per_extra_hop_s'] * 1000:.1f} ms each"
        )
        lines.append(
            f"denoising: {hop['denoise_share_of_stage_work']:.0%} of the graph's stage work at c=1"
        )
    t = s["target"]
    lines.append(
        f"target at c={t['level']}: throughput {t['throughput_ratio']:.2f}x (>= {TARGET_RATIO}), "
        f"p95 {t['p95_ratio']:.2f}x (<= 1): {'met' if t['met'] else 'not met'}"
    )
    if s["noisy_levels"]:
        lines.append(
            f"NOISY (other tenants took > {NOISY_OTHERS:.0%} of the cores): "
            + ", ".join(s["noisy_levels"])
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
