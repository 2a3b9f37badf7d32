"""Benchmark: many-LoRA serving, the multiplexed graph against a pipeline that loads each
request's adapter.

Closed-loop load over HTTP (the client of ``benchmarks/serve.py``): 4 client threads, each
sending its next ``POST /v1/generate`` as soon as the previous one returns. Every request
names one of 8 adapters, drawn with Zipf-skewed popularity (weight 1 / rank^1.1: the top
adapter gets ~37% of requests, the last ~3%), the same sequence for every contender:

- **graph**: ``flows.serve.build_app`` with ``loras.registry`` and ``loras.max_per_replica``
  4, two base replicas: Serve's model multiplexing routes each request to a base replica
  that holds its adapter, loading it (and evicting the least recently used) only where none
  does; the other settings are ``benchmarks/serve.py``'s ``GRAPH_SETTINGS``.
- **baseline**: ``benchmarks/serve.py``'s baseline (a FastAPI ingress and a deployment
  holding a ``StableDiffusion3Pipeline``), each call doing what a user does per request:
  ``load_lora_weights`` from the same local registry folder, ``set_adapters``, generate,
  ``unload_lora_weights``. One replica of 2 CPUs and two of 1 CPU; the better at c=4 is the
  baseline.

Contenders are deployed side by side and measured interleaved, rounds repeated (as in
``benchmarks/serve.py``). Adapters: ``flows.models.build_tiny_lora`` (rank 16 on the
attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, random matrices), on the
same 28.8M-parameter DiT as ``benchmarks/serve.py``.

    python -m benchmarks.serve_lora           # 6 steps at 128x128, then the 4-step student's
    python -m benchmarks.serve_lora --quick   # the tiny bundle; < 3 min

Target (issue 12): at c=4 the graph >= 1.5x the best baseline's requests/s, p95 no worse.
"""

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from benchmarks.prep import NOISY_OTHERS, quiet_model_logs
from benchmarks.serve import (
    GRAPH_SETTINGS,
    MAX_SEQUENCE_LENGTH,
    NUM_CPUS,
    QUIET_MAX_WAIT_S,
    TRANSFORMER_HEADS,
    TRANSFORMER_LAYERS,
    BaselineIngress,
    DiffusersPipeline,
    brief,
    free_port,
    measure_level,
    pooled,
    requests,
)
from benchmarks.train import build_bundle
from cluster.ray_runtime import init_ray
from flows.models import build_tiny_bundles, build_tiny_lora
from flows.serve import build_app
from schemas.api import GenerateRequest, LoraRef
from schemas.config import RayConfig, ServeConfig, load_config

NUM_ADAPTERS, ZIPF_EXPONENT, LORA_RANK = 8, 1.1, 16
MAX_SETS_PER_REPLICA, BASE_REPLICAS = 4, 2
LEVEL = 4
TARGET_THROUGHPUT_RATIO = 1.5


@serve.deployment
class DiffusersLoraPipeline(DiffusersPipeline.func_or_class):
    """``DiffusersPipeline`` with each request's adapter loaded for it and unloaded after."""

    def __init__(self, bundle: str, max_sequence_length: int, registry: str) -> None:
        super().__init__(bundle, max_sequence_length)
        self.registry = Path(registry)
        self.adapter_lock = threading.Lock()

    def generate(self, body: GenerateRequest) -> tuple[bytes, float]:
        start = time.perf_counter()
        [lora] = body.loras
        with self.adapter_lock:  # one request's adapter in the pipeline at a time
            self.pipe.load_lora_weights(self.registry / lora.name, adapter_name=lora.name)
            self.pipe.set_adapters([lora.name], [lora.scale])
            try:
                png, _ = super().generate(body)
            finally:
                self.pipe.unload_lora_weights()
        return png, time.perf_counter() - start


def baseline_app(bundle: Path, registry: Path, num_replicas: int) -> serve.Application:
    pipeline = DiffusersLoraPipeline.options(
        name="pipeline",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": NUM_CPUS / num_replicas},
        max_ongoing_requests=2,
    ).bind(str(bundle), MAX_SEQUENCE_LENGTH, str(registry))
    return BaselineIngress.options(
        name="ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32
    ).bind(pipeline)


def adapter_requests(workload: dict[str, Any], names: list[str]) -> Iterator[GenerateRequest]:
    """``benchmarks.serve.requests`` with one adapter each, Zipf-skewed, seeded."""
    rng = random.Random(0)
    weights = [1 / rank**ZIPF_EXPONENT for rank in range(1, len(names) + 1)]
    for body in requests(workload):
        [name] = rng.choices(names, weights)
        yield body.model_copy(update={"loras": [LoraRef(name=name)]})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny bundle, one workload")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/serve_lora.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_model_logs()
    work = Path(tempfile.mkdtemp(prefix="raygen-bench-serve-lora-"))
    tiny = build_tiny_bundles(work / "tiny", names=["t2i"])
    if args.quick:
        bundle, num_params = tiny["t2i"], None
        workloads = {"tiny-8-steps": {"num_inference_steps": 8, "height": 32, "width": 32}}
        num_measured, quiet_wait_s = 12, 5.0
    else:
        bundle, num_params = build_bundle(
            work, tiny["t2i"], TRANSFORMER_LAYERS, TRANSFORMER_HEADS, 0
        )
        workloads = {
            "6-steps-128px": {"num_inference_steps": 6, "height": 128, "width": 128},
            # A distilled student's request: what raygen distill serves.
            "student-4-steps-64px": {"num_inference_steps": 4, "height": 64, "width": 64},
        }
        num_measured, quiet_wait_s = 24, QUIET_MAX_WAIT_S
    registry = work / "loras"
    names = [f"adapter-{index}" for index in range(NUM_ADAPTERS)]
    for seed, name in enumerate(names):
        build_tiny_lora(bundle, registry / name, seed=seed, rank=LORA_RANK)
    adapter_bytes = (registry / names[0] / "pytorch_lora_weights.safetensors").stat().st_size

    os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"
    config = load_config(
        ServeConfig,
        values={
            "bundle.uri": str(bundle),
            "output": str(work / "outputs"),
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
            **GRAPH_SETTINGS,
            "deployments.base.num_replicas": BASE_REPLICAS,
            "loras.registry": str(registry),
            "loras.max_per_replica": MAX_SETS_PER_REPLICA,
        },
    )
    apps = {f"baseline_{n}x{NUM_CPUS // n}cpu": baseline_app(bundle, registry, n) for n in (1, 2)}
    apps["graph"] = build_app(config)
    init_ray(RayConfig(num_cpus=NUM_CPUS * len(apps)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, app in apps.items():
        serve.run(app, name=name, route_prefix=f"/{name}")
    urls = {name: f"http://127.0.0.1:{port}/{name}" for name in apps}
    base = serve.get_deployment_handle("base", "graph")

    results: dict[str, Any] = {}
    turn = 0
    for workload_name, workload in workloads.items():
        workload = {**workload, "guidance_scale": 5.0}
        bodies = {name: adapter_requests(workload, names) for name in apps}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in apps}
        loads_before = sum(base_loads(base))
        for round_index in range(args.rounds):
            order = list(apps)[turn % len(apps) :] + list(apps)[: turn % len(apps)]
            turn += 1
            for name in order:
                run = measure_level(
                    name, urls[name], bodies[name], LEVEL, num_measured, quiet_wait_s
                )
                runs[name].append(run)
                print(f"  {workload_name} round {round_index + 1} {name}: {brief(run)}", flush=True)
        contenders = {name: pooled(name_runs) for name, name_runs in runs.items()}
        baselines = [name for name in contenders if name.startswith("baseline")]
        best = max(baselines, key=lambda name: contenders[name]["throughput_rps"])
        graph = contenders["graph"]
        served = sum(run["num_measured"] for run in runs["graph"])
        results[workload_name] = {
            "workload": {**workload, "max_sequence_length": MAX_SEQUENCE_LENGTH},
            "contenders": contenders,
            "best_baseline": best,
            "graph_adapter_loads": sum(base_loads(base)) - loads_before,
            "graph_requests_measured": served,
            "throughput_ratio": graph["throughput_rps"] / contenders[best]["throughput_rps"],
            "p95_ratio": graph["p95_s"] / contenders[best]["p95_s"],
        }
        results[workload_name]["target_met"] = (
            results[workload_name]["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO
            and results[workload_name]["p95_ratio"] <= 1.0
        )
    serve.shutdown()
    ray.shutdown()

    summary = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "quick": args.quick,
        "model": {
            "class": "SD3Transformer2DModel",
            "params": num_params,
            "layers": None if args.quick else TRANSFORMER_LAYERS,
            "heads": None if args.quick else TRANSFORMER_HEADS,
        },
        "adapters": {
            "count": NUM_ADAPTERS,
            "rank": LORA_RANK,
            "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "file_bytes": adapter_bytes,
            "popularity": f"Zipf, weight 1/rank^{ZIPF_EXPONENT}",
        },
        "concurrency": LEVEL,
        "rounds": args.rounds,
        "num_measured_per_round": num_measured,
        "graph": {"base_replicas": BASE_REPLICAS, "max_per_replica": MAX_SETS_PER_REPLICA},
        "baseline": "StableDiffusion3Pipeline per replica: load_lora_weights, set_adapters, "
        "generate, unload_lora_weights per request; 1x2 CPU and 2x1 CPU tried",
        "workloads": results,
    }
    print(report(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return summary


def base_loads(base: Any) -> list[int]:
    """Adapter loads so far on each base replica that answers (stats of one replica per
    call: ask a few times and keep the distinct replicas' counts)."""
    seen: dict[str, int] = {}
    for _ in range(16):
        stats = base.stats.remote().result()
        seen[stats["replica"]] = stats["adapter_loads"]
    return list(seen.values())


def report(s: dict[str, Any]) -> str:
    model = s["model"]
    size = (
        "the tiny t2i bundle"
        if model["params"] is None
        else f"SD3Transformer2DModel {model['params'] / 1e6:.1f}M params"
    )
    a = s["adapters"]
    lines = [
        f"model: {size}; {a['count']} LoRAs of rank {a['rank']} ({a['file_bytes'] / 1e6:.2f} MB "
        f"each), {a['popularity']}; c={s['concurrency']}, {s['rounds']} interleaved rounds",
    ]
    for name, w in s["workloads"].items():
        lines.append(f"{name}:")
        for contender, r in w["contenders"].items():
            lines.append(f"  {contender:<18} {brief(r)}" + (" NOISY" if r["noisy"] else ""))
        lines.append(
            f"  graph / {w['best_baseline']}: throughput {w['throughput_ratio']:.2f}x (>= "
            f"{TARGET_THROUGHPUT_RATIO}), p95 {w['p95_ratio']:.2f}x (<= 1); graph adapter loads "
            f"{w['graph_adapter_loads']} for {w['graph_requests_measured']}+ requests: "
            + ("met" if w["target_met"] else "not met")
        )
    if any(r["noisy"] for w in s["workloads"].values() for r in w["contenders"].values()):
        lines.append(f"(NOISY: other tenants took > {NOISY_OTHERS:.0%} of the cores)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
