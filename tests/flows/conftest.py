"""Fixtures the demo, training and distillation tests share: one `raygen demo` run, whose
tiny bundles and prep shards the training and distillation tests read.

The demo's prep is the prep those tests need (the sample corpus, the t2i and t2v bundles, the
captioner and the scorer), so the suite runs it once instead of twice.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]


@dataclass(frozen=True)
class DemoRun:
    data: Path  # the demo's --data-dir
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """`raygen demo` as a new user runs it: a subprocess, its own local Ray, one data folder."""
    data = tmp_path_factory.mktemp("demo") / "raygen-data"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--data-dir", str(data)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return DemoRun(data, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def tiny_bundles(demo_run: DemoRun) -> dict[str, Path]:
    return {
        name: demo_run.data / "bundles" / name for name in ("t2i", "t2v", "captioner", "scorer")
    }


@pytest.fixture(scope="session")
def prep_shards(demo_run: DemoRun) -> Path:
    """Shards `raygen prep` made in the demo from the sample corpus: image buckets from the t2i
    bundle, video buckets from the t2v bundle."""
    return demo_run.data / "shards"
