"""`raygen plan`: GPU-hours and cluster shape from measured per-stage rates (issue 14).

The rates come from `benchmarks/gpu.py`'s JSON (one GPU, measured) or from flags (given);
every figure in the plan names which. The arithmetic:

- prep: images / (VAE-encode images/s per GPU). Only the VAE encode was measured: decoding,
  captioning and text encoding are not in it, so the prep figure is a lower bound.
- train: samples x FLOPs per sample / (achieved FLOP/s per GPU). FLOPs per sample scale from
  the measured model's by parameters x tokens (assumed: the same MFU at another size, and
  attention's share unchanged); at the measured size it is the measured samples/s.
- serve: one replica serves one image at a time in ``seconds_per_image`` (batching added 7%
  on the measured GPU: a replica is one server). Replicas: the fewest c whose M/M/c p95
  response time (Erlang C; conservative for the near-constant service times of a denoiser)
  meets the target at the requested rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from schemas.errors import RaygenError

HOURS = 3600.0


@dataclass(frozen=True)
class Rate:
    value: float
    source: str  # "measured: <file>, <device>" or "given"


@dataclass(frozen=True)
class Rates:
    prep_images_per_s: Rate  # VAE encode, one GPU, its best batch
    train_samples_per_s: Rate  # one GPU, at train_params x train_tokens
    train_params: float
    train_tokens: int  # image + text tokens per sample
    serve_seconds_per_image: Rate  # the whole graph, one image at a time, one GPU


def measured_rates(path: str | Path) -> Rates:
    """The rates in a `benchmarks/gpu.py` JSON: the best prep and serve figures per GPU."""
    report = json.loads(Path(path).read_text())
    device = report["parts"]["train"]["result"]["environment"].get("device_name", "a GPU")
    source = f"measured: {Path(path).name}, {device}"
    try:
        train = report["parts"]["train"]["result"]["result"]
        encode = report["parts"]["prep"]["result"]["encode"]
        sweep = report["parts"]["serve"]["result"]["sweep"]
    except KeyError as err:
        raise RaygenError(f"{path}: no {err.args[0]} in it; run benchmarks.gpu's parts") from None
    graph = [row for row in sweep if "graph_images_per_s" in row]
    return Rates(
        prep_images_per_s=Rate(max(row["images_per_s"] for row in encode), source),
        train_samples_per_s=Rate(train["samples_per_s"], source),
        train_params=float(train["num_params"]),
        train_tokens=int(train["tokens_per_sample"]),
        # Batch 1: what a replica does for the request in front of it.
        serve_seconds_per_image=Rate(
            1 / next(row["graph_images_per_s"] for row in graph if row["batch_size"] == 1),
            source,
        ),
    )


@dataclass(frozen=True)
class Workload:
    prep_images: float | None = None
    train_samples: float | None = None
    train_params: float | None = None  # None: the measured model's
    train_tokens: int | None = None
    serve_images_per_s: float | None = None
    serve_p95_s: float | None = None
    days: float = 7.0  # the wall time prep and train are sized to


def erlang_c(servers: int, offered: float) -> float:
    """P(a request waits) in M/M/c with ``servers`` and ``offered`` load (arrival rate x
    service time), offered < servers."""
    term, total = 1.0, 1.0  # offered^k / k!, summed for k < servers
    for k in range(1, servers):
        term *= offered / k
        total += term
    last = term * offered / servers / (1 - offered / servers)
    return last / (total + last)


def replicas_for(rate: float, service_s: float, p95_s: float) -> tuple[int, float]:
    """The fewest replicas whose M/M/c p95 response time (service plus the 95th percentile
    wait) meets ``p95_s`` at ``rate`` requests/s; and that p95."""
    if service_s > p95_s:
        raise RaygenError(
            f"serve: one image takes {service_s:.2f} s on one GPU, over the p95 target of "
            f"{p95_s} s: no number of replicas meets it"
        )
    offered = rate * service_s
    servers = max(1, math.floor(offered) + 1)
    while True:
        waits = erlang_c(servers, offered)
        drain = servers / service_s - rate  # requests/s the queue empties at
        wait_95 = 0.0 if waits <= 0.05 else math.log(waits / 0.05) / drain
        if service_s + wait_95 <= p95_s:
            return servers, service_s + wait_95
        servers += 1


def plan(rates: Rates, work: Workload) -> dict[str, Any]:
    result: dict[str, Any] = {"rates": asdict(rates), "workload": asdict(work)}
    days_h = work.days * 24
    if work.prep_images is not None:
        gpu_h = work.prep_images / rates.prep_images_per_s.value / HOURS
        result["prep"] = {
            "gpu_hours": gpu_h,
            "gpus_for_days": math.ceil(gpu_h / days_h),
            "rate_source": rates.prep_images_per_s.source,
            "covers": "VAE encode only (decode, captions, text encoders not measured): a "
            "lower bound",
        }
    if work.train_samples is not None:
        params = work.train_params or rates.train_params
        tokens = work.train_tokens or rates.train_tokens
        # Assumed: FLOPs per sample scale with params x tokens, at the measured MFU.
        scale = (params * tokens) / (rates.train_params * rates.train_tokens)
        per_gpu = rates.train_samples_per_s.value / scale
        gpu_h = work.train_samples / per_gpu / HOURS
        result["train"] = {
            "samples_per_s_per_gpu": per_gpu,
            "gpu_hours": gpu_h,
            "gpus_for_days": math.ceil(gpu_h / days_h),
            "rate_source": rates.train_samples_per_s.source
            + ("" if scale == 1 else f"; scaled by params x tokens ({scale:.3g}x): assumed"),
        }
    if work.serve_images_per_s is not None:
        if work.serve_p95_s is None:
            raise RaygenError("serve: give the p95 target (--p95-s) with the rate")
        service = rates.serve_seconds_per_image.value
        replicas, p95 = replicas_for(work.serve_images_per_s, service, work.serve_p95_s)
        result["serve"] = {
            "replicas": replicas,
            "gpus": replicas,
            "p95_s": p95,
            "utilisation": work.serve_images_per_s * service / replicas,
            "gpu_hours_per_day": replicas * 24,
            "rate_source": rates.serve_seconds_per_image.source,
            "model": "M/M/c (Erlang C), one image at a time per replica",
        }
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    days = result["workload"]["days"]
    if "prep" in result:
        prep = result["prep"]
        lines.append(
            f"prep: {prep['gpu_hours']:,.0f} GPU-hours ({prep['gpus_for_days']} GPUs for "
            f"{days:g} days); {prep['covers']} [{prep['rate_source']}]"
        )
    if "train" in result:
        train = result["train"]
        lines.append(
            f"train: {train['samples_per_s_per_gpu']:.2f} samples/s a GPU, "
            f"{train['gpu_hours']:,.0f} GPU-hours ({train['gpus_for_days']} GPUs for "
            f"{days:g} days) [{train['rate_source']}]"
        )
    if "serve" in result:
        serve = result["serve"]
        lines.append(
            f"serve: {serve['replicas']} GPU replicas (p95 {serve['p95_s']:.2f} s, "
            f"{serve['utilisation']:.0%} busy), {serve['gpu_hours_per_day']:,} GPU-hours a "
            f"day [{serve['rate_source']}]"
        )
    return lines
