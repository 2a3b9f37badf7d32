"""`raygen plan`: GPU-hours and replicas from the rates benchmarks/gpu.py measured."""

import json
import math
from pathlib import Path

import pytest

from flows.cli import main
from flows.plan import Rate, Rates, Workload, erlang_c, measured_rates, plan, replicas_for
from schemas.errors import RaygenError

GPU_JSON = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "gpu.json"


def test_erlang_c_and_replicas_are_the_textbook_ones():
    # M/M/2 at an offered load of 1: P(wait) = (1/2 * 2) / (1 + 1 + 1) = 1/3.
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) is the utilisation
    # A loose target needs just enough replicas to keep up; a tight one needs more.
    loose, _ = replicas_for(rate=10, service_s=1.0, p95_s=60)
    tight, p95 = replicas_for(rate=10, service_s=1.0, p95_s=1.2)
    assert loose == 11 and tight > loose and p95 <= 1.2
    with pytest.raises(RaygenError, match="over the p95 target of 0.5 s"):
        replicas_for(rate=1, service_s=1.0, p95_s=0.5)


def test_the_measured_rates_and_a_plan_on_them():
    report = json.loads(GPU_JSON.read_text())
    rates = measured_rates(GPU_JSON)
    train = report["parts"]["train"]["result"]["result"]
    assert rates.train_samples_per_s.value == train["samples_per_s"]
    assert rates.train_params == train["num_params"] and "H200" in rates.prep_images_per_s.source
    result = plan(rates, Workload(prep_images=1e9, train_samples=1e9, days=30))
    assert result["prep"]["gpu_hours"] == pytest.approx(1e9 / rates.prep_images_per_s.value / 3600)
    assert result["train"]["gpus_for_days"] == math.ceil(result["train"]["gpu_hours"] / 720)

    # Twice the parameters at the same tokens: half the samples/s, said to be assumed.
    bigger = plan(rates, Workload(train_samples=1e9, train_params=2 * rates.train_params))
    assert bigger["train"]["samples_per_s_per_gpu"] == pytest.approx(
        result["train"]["samples_per_s_per_gpu"] / 2
    )
    assert "assumed" in bigger["train"]["rate_source"]


def test_raygen_plan_prints_the_plan_and_names_given_rates(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = main(
        ["plan", "--serve-rps", "4", "--p95-s", "10", "--serve-seconds", "2", "--out", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("serve: ") and "[given]" in printed
    serve = json.loads(out.read_text())["serve"]
    assert serve["replicas"] >= 9 and serve["p95_s"] <= 10  # 8 busy on average at 2 s each
    assert main(["plan", "--serve-rps", "4"]) == 2
    assert "give the p95 target" in capsys.readouterr().err
    assert main(["plan", "--rates", str(tmp_path / "none.json"), "--prep-images", "1"]) == 2


def test_rates_given_by_hand_plan_without_a_gpu_run():
    rates = Rates(
        prep_images_per_s=Rate(100.0, "given"),
        train_samples_per_s=Rate(5.0, "given"),
        train_params=1e9,
        train_tokens=1024,
        serve_seconds_per_image=Rate(0.5, "given"),
    )
    result = plan(rates, Workload(prep_images=3.6e5, train_samples=1.8e5))
    assert result["prep"]["gpu_hours"] == pytest.approx(1.0)
    assert result["train"]["gpu_hours"] == pytest.approx(10.0)
