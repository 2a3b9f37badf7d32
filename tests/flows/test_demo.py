"""`raygen demo` end to end, as a new user runs it: a subprocess, a local Ray, one data folder
(the session fixture ``demo_run`` in conftest.py, whose shards the training tests read)."""

import json

import numpy as np
import pytest
from PIL import Image

from flows.models import TINY_BUNDLES


@pytest.mark.slow
# The suite runs this first among the demo's users: its time includes waiting for the rest
# of `raygen demo` (the shared fixture, started in the background), so twice the usual limit.
@pytest.mark.timeout(600)
def test_demo_builds_bundles_corpus_and_generates_on_ray(demo_run):
    data, stdout = demo_run.data, demo_run.stdout
    assert "[5/5]" in stdout and "done in" in stdout
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["num_written"] > 0 and manifest["quarantined"]
    assert sorted(p.name for p in (data / "bundles").iterdir()) == sorted(TINY_BUNDLES)
    assert any((data / "corpus").glob("*.mp4")) and any((data / "corpus").glob("photo_*"))
    assert (data / "runs" / "train" / "bundle" / "transformer" / "config.json").exists()
    image = np.asarray(Image.open(data / "demo" / "sample.png"))
    assert image.shape == (64, 64, 3)
    assert image.std() > 0  # a decoded image, not a blank canvas


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
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert stage in demo_run.stdout
    assert any(line.startswith("prep: ") and "rows done" in line for line in lines)
    assert "prep: " in demo_run.stdout and "rows written from" in demo_run.stdout
    assert any(line.startswith("[raygen] step 4/4 loss") for line in lines)
