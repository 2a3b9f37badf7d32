"""Benchmark: the `raygen serve` graph against one diffusers pipeline per Serve replica.

Closed-loop load over HTTP: N client threads, each sending its next ``POST /v1/generate`` as
soon as the previous one returns, at N = 1, 4, 8 and 16, against

- **graph**: ``flows.serve.build_app`` (ingress -> graph -> text_encoder -> base -> vae_decode
  -> safety, each its own deployment; the graph passes each stage's response on to the next
  stage's call, so only the last result comes back to it);
- **baseline**: what users build today after Ray's Stable Diffusion example: a FastAPI
  ingress deployment and a deployment holding a ``StableDiffusion3Pipeline.from_pretrained``
  of the same bundle, one request per pipeline call, no stage split, no batching. It runs with
  one replica (torch on 2 threads) and with two (1 thread each); the better one at N=8 is
  the baseline the target compares against, and both are reported.

All contenders are deployed side by side (one Serve app each, under its own route prefix) in
one local Ray, and measured interleaved: each round runs every level, and at each level every
contender in turn, the order rotating from level to level; rounds repeat. Ray gets one set of
logical CPUs per contender, so that all of them deploy at once; each replica still gets the
torch threads of its own ``num_cpus``, and only the contender under load uses the cores.
The same client, the same request settings (steps, size, guidance, T5 length), the same
prompts (distinct, so the graph's embedding cache never hits a prompt; only the shared empty
negative prompt hits), and the same seeds.

    python -m benchmarks.serve            # 28.8M-param DiT, c = 1, 4, 8, 16, 2 rounds
    python -m benchmarks.serve --quick    # the tiny bundle (8 steps, 32x32), c = 1 and 8; < 3 min
    python -m benchmarks.serve --levels 8 --set deployments.base.batch_wait_timeout_s=1.0

Reported (printed, and as JSON at ``--out``): per contender and N, throughput (requests/s,
median over rounds) and p50/p95 latency of the measured requests (warm-up discarded); the
graph's throughput and p95 ratios against the best baseline (targets at N=8: >= 0.95x
throughput); the base's batch sizes at each N; at N=1 the graph's added latency against the
baseline whose replicas have the graph base's threads (target: < 20 ms), and what Serve and
the split add to a request beyond the stages' own work (``latency_c1``).
"""

import argparse
import base64
import io
import json
import os
import platform
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

NUM_CPUS = 2  # the cores the contender under load runs on; the machine has 2
# At c=8 the graph serves at least this fraction of the best baseline's requests/s; at c=1 it
# adds less than this to a request's p50 against the baseline with its base's threads.
TARGET_LEVEL, TARGET_RATIO, TARGET_ADDED_LATENCY_S = 8, 0.95, 0.020
# The machine is shared: before each level wait (a while, not forever) for other tenants to
# go quiet, and flag levels during which they took more than NOISY_OTHERS of the cores.
QUIET_MAX_WAIT_S = 60.0
# The base transformer: SD3's MMDiT at 8 layers of 10 heads of 32 (width 320), 28.8M params,
# so that denoising is most of a request (the JSON's denoise_share_of_stage_work).
TRANSFORMER_LAYERS, TRANSFORMER_HEADS = 8, 10
# T5 tokens per prompt, on both sides (ServeConfig.max_sequence_length, the pipeline's
# max_sequence_length): 77 CLIP + 77 T5 positions of text per image.
MAX_SEQUENCE_LENGTH = 77

# What a user serving this model on a 2-core CPU machine would write. The base DiT is sized
# like the best baseline: two replicas of one CPU (torch on one thread each), because a
# second intra-op thread speeds one request up by only ~9% here while a second replica
# doubles the work in flight. The other stages are light (tiny text encoders and VAE, a PNG)
# and the graph and ingress only route; they reserve no CPU (Ray gives them 1 thread each),
# so the graph reserves the same 2 CPUs as the baseline. Batches take whatever is queued
# and wait for nothing more: on a CPU a batch gains little, and at low load every wait adds
# to every request (--set deployments.base.batch_wait_timeout_s=1.0 shows full batches).
GRAPH_SETTINGS: dict[str, Any] = {
    "deployments.ingress.num_cpus": 0,
    "deployments.ingress.max_ongoing_requests": 32,
    "deployments.graph.num_cpus": 0,
    "deployments.graph.max_ongoing_requests": 32,
    "deployments.text_encoder.num_cpus": 0,
    "deployments.text_encoder.max_ongoing_requests": 16,
    "deployments.text_encoder.max_batch_size": 8,
    "deployments.text_encoder.batch_wait_timeout_s": 0.0,
    "deployments.base.num_replicas": 2,
    "deployments.base.num_cpus": 1,
    "deployments.base.max_ongoing_requests": 8,
    "deployments.base.max_batch_size": 8,
    "deployments.base.batch_wait_timeout_s": 0.0,
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

    def generate(self, body: GenerateRequest) -> tuple[bytes, float]:
        """The PNG, and the seconds the call took in this replica (as the graph's stages
        report theirs)."""
        start = time.perf_counter()
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
        return buffer.getvalue(), time.perf_counter() - start

    def threads(self) -> int:
        return torch.get_num_threads()


@serve.deployment
@serve.ingress(baseline_api)
class BaselineIngress:
    def __init__(self, pipeline: DeploymentHandle) -> None:
        self.pipeline = pipeline

    @baseline_api.post("/v1/generate")
    async def generate(self, body: GenerateRequest) -> GenerateResponse:
        start = time.perf_counter()
        png, seconds = await self.pipeline.generate.remote(body)
        return GenerateResponse(
            images=[GeneratedImage(b64_json=base64.b64encode(png).decode())],
            seed=body.seed,
            seeds=[body.seed],
            model="diffusers",
            nsfw_content_detected=[False],
            stage_seconds={"pipeline": seconds, "total": time.perf_counter() - start},
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


def measure_level(
    name: str,
    url: str,
    bodies: Iterator[GenerateRequest],
    level: int,
    num_measured: int,
    quiet_wait_s: float,
) -> dict[str, Any]:
    """One closed-loop run of one contender at one level; for the graph, the base's batch
    sizes and the encoder cache over it (stats deltas)."""
    graph = name == "graph"
    busy_before = wait_for_quiet(quiet_wait_s)
    before = get_json(f"{url}/v1/stats") if graph else None
    with cpu_use() as cpu:
        measured = closed_loop(url, bodies, level, num_measured)
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
    return measured


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One contender at one level over the rounds: throughput as the median of the rounds',
    latencies pooled; what each request spent beyond its stages' own work."""
    latencies = [latency for run in runs for latency in run["latencies_s"]]
    records = [record for run in runs for record in run["requests"]]
    overhead = [
        record["latency_s"]
        - sum(s for stage, s in record["stage_seconds"].items() if stage != "total")
        for record in records
    ]
    batches: Counter[int] = Counter()
    for run in runs:
        batches.update(run.get("base_batch_sizes", {}))
    result = {
        "throughput_rps": statistics.median(run["throughput_rps"] for run in runs),
        "throughput_rps_rounds": [run["throughput_rps"] for run in runs],
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "num_measured": len(latencies),
        "stage_seconds_median": {
            stage: statistics.median(r["stage_seconds"][stage] for r in records)
            for stage in records[0]["stage_seconds"]
        },
        "beyond_stage_work_s_median": statistics.median(overhead),
        "noisy": any(run["noisy"] for run in runs),
        "others_util": max(run["cpu"]["others_util"] for run in runs),
        "rounds": [
            {key: value for key, value in run.items() if key not in ("requests", "latencies_s")}
            for run in runs
        ],
    }
    if batches:
        result["base_batch_sizes"] = dict(sorted(batches.items()))
    return result


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
    parser.add_argument(
        "--quick", action="store_true", help="the tiny bundle, 8 steps at 32x32, c = 1 and 8"
    )
    parser.add_argument(
        "--levels",
        type=lambda text: [int(level) for level in text.split(",")],
        default=None,
        help="concurrency levels, comma-separated (default 1,4,8,16; --quick: 1,8)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (--quick: 2)")
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
    work = Path(tempfile.mkdtemp(prefix="raygen-bench-serve-"))
    tiny = build_tiny_bundles(work / "tiny", names=["t2i"])
    rounds = args.rounds or 2
    # A smoke run does not wait long for a shared machine to go quiet.
    quiet_wait_s = 5.0 if args.quick else QUIET_MAX_WAIT_S
    if args.quick:
        # The tiny t2i bundle as it is: a request is mostly what serving adds, not model work.
        bundle, num_params, layers, heads = tiny["t2i"], None, None, None
        levels = args.levels or [1, 8]
        num_measured = {level: max(8, 2 * level) for level in levels}
        workload = {"num_inference_steps": 8, "height": 32, "width": 32}
    else:
        layers, heads = TRANSFORMER_LAYERS, TRANSFORMER_HEADS
        bundle, num_params = build_bundle(work, tiny["t2i"], layers, heads, seed=0)
        levels = args.levels or [1, 4, 8, 16]
        # At least 24 for a p95 per round, and 4 rounds of the clients.
        num_measured = {level: max(24, 4 * level) for level in levels}
        workload = {"num_inference_steps": 6, "height": 128, "width": 128}
    workload |= {"guidance_scale": 5.0}

    # Serve's logs go to files only, not through every replica's stderr to this console.
    # Replicas inherit the variable.
    os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"
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
    apps = {
        f"baseline_{n}x{NUM_CPUS // n}cpu": baseline_app(bundle, n, MAX_SEQUENCE_LENGTH)
        for n in (1, 2)
    }
    apps["graph"] = build_app(config)
    # Logical CPUs for every contender at once (see the module docstring).
    init_ray(RayConfig(num_cpus=NUM_CPUS * len(apps)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    threads = {str(cpus): replica_threads(cpus) for cpus in (0, 1, NUM_CPUS)}
    deploy_s = {}
    for name, app in apps.items():
        start = time.perf_counter()
        serve.run(app, name=name, route_prefix=f"/{name}")
        deploy_s[name] = time.perf_counter() - start
    urls = {name: f"http://127.0.0.1:{port}/{name}" for name in apps}
    pipeline_threads = {
        name: serve.get_deployment_handle("pipeline", name).threads.remote().result()
        for name in apps
        if name != "graph"
    }
    # Every contender gets the same request stream.
    bodies = {name: requests(workload) for name in apps}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        name: {level: [] for level in levels} for name in apps
    }
    names = list(apps)
    turn = 0
    for round_index in range(rounds):
        for level in levels:
            order = names[turn % len(names) :] + names[: turn % len(names)]
            turn += 1
            for name in order:
                run = measure_level(
                    name, urls[name], bodies[name], level, num_measured[level], quiet_wait_s
                )
                runs[name][level].append(run)
                print(f"  round {round_index + 1} {name} c={level}: {brief(run)}", flush=True)
    serve.shutdown()
    ray.shutdown()
    contenders = {
        name: {
            "deploy_s": deploy_s[name],
            "pipeline_torch_threads": pipeline_threads.get(name),
            "levels": {level: pooled(level_runs) for level, level_runs in by_level.items()},
        }
        for name, by_level in runs.items()
    }

    baselines = [name for name in contenders if name.startswith("baseline")]
    top = TARGET_LEVEL if TARGET_LEVEL in levels else levels[-1]
    best = max(baselines, key=lambda name: contenders[name]["levels"][top]["throughput_rps"])
    graph = contenders["graph"]["levels"]
    base = config.deployments.base
    # The baseline whose replicas run torch on the threads the graph's base replicas have.
    same_threads = f"baseline_{NUM_CPUS // max(1, round(base.num_cpus))}x{round(base.num_cpus)}cpu"
    summary: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "quick": args.quick,
        "model": {
            "class": "SD3Transformer2DModel",
            "params": num_params,
            "layers": layers,
            "heads": heads,
            "attention_head_dim": 32,
            "text_encoders": "the tiny t2i bundle's CLIP-L, CLIP-G and T5 shapes",
        },
        "workload": {**workload, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "cores_under_load": NUM_CPUS,
        "ray_logical_cpus": NUM_CPUS * len(apps),
        "replica_threads_by_num_cpus": threads,
        "graph_settings": {
            stage: getattr(config.deployments, stage).model_dump(exclude_none=True)
            for stage in ("ingress", "graph", "text_encoder", "base", "vae_decode", "safety")
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
        "rounds": rounds,
        "num_measured_per_round": num_measured,
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
        "latency_c1": latency_c1(contenders, same_threads, config) if 1 in levels else None,
    }
    summary["noisy_levels"] = [
        f"{name} c={level}"
        for name, contender in contenders.items()
        for level, result in contender["levels"].items()
        if result["noisy"]
    ]
    ratio = summary["ratios"][top]
    added = summary["latency_c1"]["graph_p50_minus_baseline_p50_s"] if 1 in levels else None
    summary["target"] = {
        "level": top,
        "throughput_ratio": ratio["throughput"],
        "p95_ratio": ratio["p95"],
        "added_latency_c1_s": added,
        "met": ratio["throughput"] >= TARGET_RATIO
        and (added is None or added < TARGET_ADDED_LATENCY_S),
    }
    print(report(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def latency_c1(
    contenders: dict[str, Any], baseline_name: str, config: ServeConfig
) -> dict[str, Any]:
    """At concurrency 1: the graph's p50 against the baseline whose replicas run torch on the
    same threads as the graph's base (what the split adds to one request), and for both
    what a request spends beyond its stages' own work (each stage's seconds in its replica,
    as the responses report them): Serve's HTTP proxy, the hops between deployments, and
    (de)serialisation. The graph's stage seconds include its batch waits."""
    graph = contenders["graph"]["levels"][1]
    baseline = contenders[baseline_name]["levels"][1]
    stage_work = {
        stage: seconds
        for stage, seconds in graph["stage_seconds_median"].items()
        if stage != "total"
    }
    return {
        "baseline": baseline_name,
        "graph_p50_s": graph["p50_s"],
        "baseline_p50_s": baseline["p50_s"],
        "graph_p50_minus_baseline_p50_s": graph["p50_s"] - baseline["p50_s"],
        "graph_stage_seconds_median": stage_work,
        "graph_batch_waits_s": {
            stage: getattr(config.deployments, stage).batch_wait_timeout_s
            for stage in ("text_encoder", "base")
        },
        "denoise_share_of_stage_work": stage_work["base"] / sum(stage_work.values()),
        "graph_beyond_stage_work_s": graph["beyond_stage_work_s_median"],
        "baseline_beyond_stage_work_s": baseline["beyond_stage_work_s_median"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(s: dict[str, Any]) -> str:
    model, w = s["model"], s["workload"]
    size = (
        "the tiny t2i bundle"
        if model["params"] is None
        else f"SD3Transformer2DModel {model['params'] / 1e6:.1f}M params ({model['layers']} "
        f"layers, {model['heads']} heads of 32)"
    )
    lines = [
        f"model: {size}; {w['height']}x{w['width']} px, {w['num_inference_steps']} steps, "
        f"guidance {w['guidance_scale']}, T5 {w['max_sequence_length']} tokens; "
        f"{s['rounds']} interleaved rounds",
        "",
        f"{'contender':<22} {'c':>3} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'n':>4}  others' CPU",
    ]
    for name, contender in s["contenders"].items():
        for level, r in contender["levels"].items():
            lines.append(
                f"{name:<22} {level:>3} {r['throughput_rps']:>8.3f} {r['p50_s']:>8.3f} "
                f"{r['p95_s']:>8.3f} {r['num_measured']:>4}  {r['others_util']:.0%}"
                + (" NOISY" if r["noisy"] else "")
            )
    lines.append("")
    lines.append(
        f"graph / best baseline ({s['best_baseline']}, best at c={s['best_baseline_chosen_at']}):"
    )
    for level, ratio in s["ratios"].items():
        batches = s["contenders"]["graph"]["levels"][level].get("base_batch_sizes")
        lines.append(
            f"  c={level}: throughput {ratio['throughput']:.2f}x, p95 {ratio['p95']:.2f}x; "
            f"base batch sizes {batches}"
        )
    c1 = s["latency_c1"]
    if c1 is not None:
        lines.append(
            f"c=1: graph p50 - {c1['baseline']} p50 = "
            f"{c1['graph_p50_minus_baseline_p50_s'] * 1000:.1f} ms; beyond the stages' own "
            f"work: graph {c1['graph_beyond_stage_work_s'] * 1000:.1f} ms, baseline "
            f"{c1['baseline_beyond_stage_work_s'] * 1000:.1f} ms; graph stages "
            + ", ".join(
                f"{k} {v * 1000:.1f} ms" for k, v in c1["graph_stage_seconds_median"].items()
            )
        )
    t = s["target"]
    added = t["added_latency_c1_s"]
    lines.append(
        f"target: c={t['level']} throughput {t['throughput_ratio']:.2f}x (>= {TARGET_RATIO}), "
        + ("" if added is None else f"c=1 added {added * 1000:.1f} ms (< 20 ms)")
        + f": {'met' if t['met'] else 'not met'}"
    )
    if s["noisy_levels"]:
        lines.append(
            f"NOISY (other tenants took > {NOISY_OTHERS:.0%} of the cores): "
            + ", ".join(s["noisy_levels"])
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
