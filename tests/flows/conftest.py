"""Fixtures many tests share: the session's two background runs (tests/conftest.py).

- ``sample_run``: tiny bundles and `raygen prep` of the sample corpus (tests/sample_prep.py),
  whose shards the training, distillation and prep tests read, so the suite preps them once.
- ``demo_run``: `raygen demo --quick`, whose VAE, bundles and evaluation the demo's,
  autoencoder's and evaluation's tests read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BackgroundRun, BackgroundRuns


@dataclass(frozen=True)
class Finished:
    data: Path  # its data folder
    stdout: str
    stderr: str


def _finished(run: BackgroundRun) -> Finished:
    returncode, stdout, stderr = run.finish()
    assert returncode == 0, stderr[-3000:]
    return Finished(run.data, stdout, stderr)


@pytest.fixture(scope="session")
def sample_run(background_runs: BackgroundRuns) -> Finished:
    return _finished(background_runs.sample)


@pytest.fixture(scope="session")
def demo_run(background_runs: BackgroundRuns) -> Finished:
    return _finished(background_runs.demo)


@pytest.fixture(scope="session")
def tiny_bundles(sample_run: Finished) -> dict[str, Path]:
    return {
        name: sample_run.data / "bundles" / name
        for name in ("t2i", "t2v", "i2v", "captioner", "scorer")
    }


@pytest.fixture(scope="session")
def prep_shards(sample_run: Finished) -> Path:
    """Shards `raygen prep` made from the sample corpus: image buckets from the t2i bundle,
    video buckets from the t2v bundle."""
    return sample_run.data / "shards"
