"""Fixtures the demo, training and distillation tests share: one `raygen demo` run, whose
tiny bundles and prep shards the training and distillation tests read.

The demo's prep is the prep those tests need (the sample corpus, the t2i and t2v bundles, the
captioner and the scorer), so the suite runs it once instead of twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DemoProcess


@dataclass(frozen=True)
class DemoRun:
    data: Path  # the demo's --data-dir
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def demo_run(demo_process: DemoProcess) -> DemoRun:
    """`raygen demo` as a new user runs it: a subprocess, its own local Ray, one data folder.
    Started in the background with the session (tests/conftest.py); this waits for it."""
    try:
        returncode = demo_process.process.wait(
            timeout=max(1.0, demo_process.deadline - time.monotonic())
        )
    finally:
        stdout = demo_process.stdout.read_text(errors="replace")
        stderr = demo_process.stderr.read_text(errors="replace")
    assert returncode == 0, stderr[-3000:]
    return DemoRun(demo_process.data, stdout, stderr)


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
