"""`raygen demo` end to end, as a new user runs it: a subprocess, a local Ray, one data folder
(the session fixture ``demo_run`` in conftest.py, whose shards the training tests read)."""

import json

import numpy as np
import pytest
from PIL import Image

from flows.models import TINY_BUNDLES


@pytest.mark.slow
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
