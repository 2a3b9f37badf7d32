"""`raygen demo` end to end, as a new user runs it: a subprocess, a local Ray, one data folder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.models import TINY_BUNDLES

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_demo_builds_bundles_corpus_and_generates_on_ray(tmp_path):
    data = tmp_path / "raygen-data"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--data-dir", str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[5/5]" in result.stdout and "done in" in result.stdout
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["num_written"] > 0 and manifest["quarantined"]
    assert sorted(p.name for p in (data / "bundles").iterdir()) == sorted(TINY_BUNDLES)
    assert any((data / "corpus").glob("*.mp4")) and any((data / "corpus").glob("photo_*"))
    assert (data / "runs" / "train" / "bundle" / "transformer" / "config.json").exists()
    image = np.asarray(Image.open(data / "demo" / "sample.png"))
    assert image.shape == (64, 64, 3)
    assert image.std() > 0  # a decoded image, not a blank canvas
