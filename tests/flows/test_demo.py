"""`raygen demo --quick` end to end, as a new user runs it: a subprocess, a local Ray, one data
folder (the session fixture ``demo_run``, tests/flows/conftest.py). The full demo's sizes
are measured by running it (benchmarks/results/demo.json), not here."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flows.demo import QUICK, TEXT_POSITIONS
from flows.models import TINY_BUNDLES
from schemas.shapes import HELD_OUT
from tests.conftest import REPO

STEPS = ("bundles", "shapes", "vae", "prep", "train", "distill", "evaluate teacher",
         "evaluate student")  # fmt: skip


@pytest.mark.slow
# The suite runs the demo's readers last; its time may include waiting for the rest of the
# background runs, so twice the usual limit.
@pytest.mark.timeout(600)
def test_quick_demo_trains_distills_serves_and_reports(demo_run):
    data, stdout = demo_run.data, demo_run.stdout
    for index in range(1, 10):
        assert f"[{index}/9]" in stdout
    assert stdout.splitlines()[-1] == f"report: {data / 'report' / 'report.md'}"
    assert set(TINY_BUNDLES) <= {p.name for p in (data / "bundles").iterdir()}

    state = json.loads((data / "report" / "demo.json").read_text())
    assert state["mode"] == "quick" and list(state["steps"]) == list(STEPS)
    assert state["steps"]["shapes"] == {**state["steps"]["shapes"], "images": QUICK.images}
    for run in ("vae", "train", "distill"):
        assert state["steps"][run]["steps"] == getattr(QUICK, f"{run}_steps")
        assert (data / "runs" / run / "bundle" / "model_index.json").exists()
    # The loop scored the held-out prompts along the way (eval_every), on each quick step.
    assert sorted(map(int, state["steps"]["train"]["eval"])) == [1, 2, 3]
    # Each target is judged from the evaluations (met or not, at smoke sizes).
    assert len(state["targets"]) == 6 and all(
        isinstance(v, bool) for v in state["targets"].values()
    )

    # The transformer reads the VAE it was trained with: 4 latent channels, 12 text positions.
    train_bundle = data / "runs" / "train" / "bundle"
    transformer = json.loads((train_bundle / "transformer" / "config.json").read_text())
    vae = json.loads((train_bundle / "vae" / "config.json").read_text())
    assert transformer["in_channels"] == vae["latent_channels"] == 4
    tokenizer = json.loads((train_bundle / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == TEXT_POSITIONS

    # The teacher from its bundle, the student through the server: every held-out prompt.
    teacher = json.loads((data / "eval" / "teacher" / "eval.json").read_text())
    student = json.loads((data / "eval" / "student" / "eval.json").read_text())
    assert teacher["bundle"] == str(train_bundle) and teacher["url"] is None
    assert student["bundle"] is None and student["url"].startswith("http://127.0.0.1:")
    assert student["settings"]["num_inference_steps"] == 4
    for result in (teacher, student):
        assert result["prompts"] == len(HELD_OUT)
        assert result["metrics"]["prompt_following"]["images"] == len(HELD_OUT) * QUICK.seeds

    report = (data / "report" / "report.md").read_text()
    assert "| teacher |" in report and "| student |" in report
    for name in ("grid-teacher.png", "grid-student.png"):
        grid = np.asarray(Image.open(data / "report" / name))
        assert grid.shape == (len(HELD_OUT) * QUICK.size, QUICK.seeds * QUICK.size, 3)
        assert grid.std() > 0  # decoded images, not a blank canvas
    for run in ("vae", "train", "distill"):
        assert f"loss-{run}.png" in report and (data / "report" / f"loss-{run}.png").exists()
        assert list((data / "runs" / run / "tensorboard").glob("events.out.tfevents.*")), run
    # The train curve has the held-out scores beside the loss (a second panel).
    assert Image.open(data / "report" / "loss-train.png").size == (1000, 360)
    assert f"tensorboard --logdir {data / 'runs'}" in report


@pytest.mark.slow
def test_a_second_run_reuses_every_finished_step_and_a_full_run_is_refused_there(demo_run):
    rerun = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--quick", "--data-dir", str(demo_run.data)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("done before, reused") == len(STEPS)
    assert "report: " in rerun.stdout

    full = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--data-dir", str(demo_run.data)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert full.returncode != 0
    assert "holds a quick demo; this is a full one" in full.stderr
    assert "Traceback" not in full.stderr


# What a new user's console may hold, at most: about two screens.
MAX_CONSOLE_LINES = 60


@pytest.mark.slow
def test_demo_console_is_raygen_lines_not_rays_internals(demo_run):
    # The fixture's output is a pipe, as in CI or `| tee`: no bars redrawn with escape codes,
    # Ray's and the libraries' output in Ray's log files, a line per stage and per update.
    console = demo_run.stdout + demo_run.stderr
    assert "\x1b" not in console and "\r" not in console
    for internal in (
        "TrainingReport(",
        "Execution plan of Dataset",
        "logging_progress",
        "torchvision",
        "Writing model shards",
        "Loading weights",
        "pid=",  # any line forwarded from a Ray worker
    ):
        assert internal not in console, internal
    lines = console.splitlines()
    assert len(lines) <= MAX_CONSOLE_LINES, console
    assert any(line.startswith("prep: ") and "rows done" in line for line in lines)
    assert "rows written from" in demo_run.stdout
    assert any(line.startswith(f"[raygen] step {QUICK.train_steps}/") for line in lines)
    assert any(line.startswith("evaluate: prompt_following:") for line in lines)
