"""cluster/jobs.py against the Jobs API of a real Ray: the session's local Ray, whose
dashboard serves it on loopback (tests/conftest.py)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray.job_submission import JobStatus, JobSubmissionClient

from actors.watermark import embed_watermark
from cluster.jobs import entrypoint, runtime_env, submit
from tests.conftest import SessionRay


def test_entrypoint_quotes_arguments() -> None:
    assert entrypoint(["prep", "--set", "input=s3://b/a b"]) == (
        "python -m flows.cli prep --set 'input=s3://b/a b'"
    )


def test_runtime_env_ships_the_repository_and_pip_is_opt_in() -> None:
    env = runtime_env()
    root = Path(__file__).resolve().parents[2]

    assert env["working_dir"] == str(root)
    assert {".git", "raygen-data", ".venv"} <= set(env["excludes"])
    assert "pip" not in env and "env_vars" not in env

    env = runtime_env(pip=["numpy>=1.26"], env_vars={"RAYGEN_X": "1"})
    assert env["pip"] == {"packages": ["numpy>=1.26"], "pip_check": False}
    assert env["env_vars"] == {"RAYGEN_X": "1"}


def test_submit_without_an_address_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    with pytest.raises(ValueError, match="RAY_ADDRESS"):
        submit(["models", "tiny", "--out", "x"])


@pytest.mark.slow
def test_successful_command_streams_logs_and_returns_0(
    session_ray: SessionRay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A command that loads no model library: what is under test is the job, not the command.
    image = tmp_path / "marked.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(embed_watermark(pixels, "raygen")).save(image)
    job_id = f"raygen-test-ok-{uuid.uuid4().hex[:8]}"

    argv = ["watermark", "detect", str(image)]
    code = submit(argv, address=session_ray.jobs_api, job_id=job_id)

    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    # The job's own output, streamed while it ran: Ray's entrypoint line and the CLI's. The job
    # ran on this machine, so it read the file here.
    assert f"python -m flows.cli watermark detect {image}" in captured.out
    assert f"{image}: watermarked (32/32 bits match)" in captured.out
    assert f"job {job_id} SUCCEEDED" in captured.err


@pytest.mark.slow
def test_failing_command_returns_its_exit_code(
    session_ray: SessionRay, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = f"raygen-test-fail-{uuid.uuid4().hex[:8]}"

    code = submit(
        ["prep", "--config", "/nonexistent.yaml"], address=session_ray.jobs_api, job_id=job_id
    )

    captured = capsys.readouterr()
    assert code != 0
    assert code == JobSubmissionClient(session_ray.jobs_api).get_job_info(job_id).driver_exit_code
    assert "/nonexistent.yaml" in captured.out  # the CLI's error, streamed from the job
    assert f"job {job_id} FAILED" in captured.err


@pytest.mark.slow
def test_no_wait_prints_the_job_id_and_explicit_address_wins_over_env(
    session_ray: SessionRay, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ray's client would otherwise replace the explicit address with this dead one.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    job_id = f"raygen-test-nowait-{uuid.uuid4().hex[:8]}"

    assert submit(["--help"], address=session_ray.jobs_api, wait=False, job_id=job_id) == 0

    err = capsys.readouterr().err
    assert job_id in err and "ray job logs --follow" in err
    monkeypatch.delenv("RAY_ADDRESS")
    client = JobSubmissionClient(session_ray.jobs_api)
    deadline = time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
