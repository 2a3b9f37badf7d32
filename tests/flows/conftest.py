"""Fixtures the training and distillation tests share: tiny bundles and prep shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.models import build_tiny_bundles
from flows.samples import build_sample_corpus

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(
        tmp_path_factory.mktemp("bundles"), names=["t2i", "t2v", "captioner", "scorer"]
    )


@pytest.fixture(scope="session")
def prep_shards(tmp_path_factory: pytest.TempPathFactory, tiny_bundles: dict[str, Path]) -> Path:
    """Shards made by `raygen prep` (its own process and Ray) from the sample corpus: image
    buckets from the t2i bundle, video buckets from the t2v bundle."""
    root = tmp_path_factory.mktemp("prep")
    build_sample_corpus(root / "corpus", num_videos=2)
    command = [
        sys.executable, "-m", "flows.cli", "prep",
        "--input", str(root / "corpus"), "--output", str(root / "shards"),
        "--bundle", str(tiny_bundles["t2i"]),
        "--set", f"video_bundle.uri={tiny_bundles['t2v']}",
        "--set", f"caption.model.uri={tiny_bundles['captioner']}",
        "--set", f"filters.scorer.uri={tiny_bundles['scorer']}",
        "--set", "ray.num_cpus=2",
    ]  # fmt: skip
    log = root / "prep.log"
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=280)
    assert done.returncode == 0, log.read_text()[-3000:]
    return root / "shards"
