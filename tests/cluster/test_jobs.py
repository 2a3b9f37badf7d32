"""cluster/jobs.py against a real Ray head (`ray start --head`) on loopback.

The head runs in its own process session and is stopped by signalling that session only,
never with `ray stop`, which would also stop any other Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray.job_submission import JobStatus, JobSubmissionClient

from actors.watermark import embed_watermark
from cluster.jobs import entrypoint, runtime_env, submit


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_jobs_api(url: str, head: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/jobs/", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Jobs API at {url} did not answer within 60 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """The Jobs API URL (http://127.0.0.1:<port>) of a one-CPU Ray head for this module."""
    # Ray puts unix sockets under the temp dir; their paths must stay under ~107 bytes.
    temp_dir = Path(f"/tmp/rg-{uuid.uuid4().hex[:8]}")
    temp_dir.mkdir()
    log = temp_dir / "ray-start.log"
    dashboard_port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        # A job's entrypoint runs `python` from the head's PATH: make it this interpreter.
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        # Ray 2.60 turns token auth on when ~/.ray/auth_token exists; pin it either way.
        "RAY_AUTH_MODE": "disabled",
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        f"--port={_free_port()}",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",  # the dashboard serves the Jobs API
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Fixed defaults that another Ray on this machine may hold.
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
    ]
    with log.open("wb") as log_file:
        head = subprocess.Popen(
            command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_jobs_api(url, head, log)
        yield url
    finally:
        # `ray start --block` stops its processes on SIGTERM; anything left in the session
        # (workers) goes with SIGKILL.
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    ray_head: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A command that loads no model library: what is under test is the job, not the command.
    image = tmp_path / "marked.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    Image.fromarray(embed_watermark(pixels, "raygen")).save(image)
    job_id = f"raygen-test-ok-{uuid.uuid4().hex[:8]}"

    argv = ["watermark", "detect", str(image)]
    code = submit(argv, address=ray_head, job_id=job_id)

    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    # The job's own output, streamed while it ran: Ray's entrypoint line and the CLI's. The job
    # ran on this machine, so it read the file here.
    assert f"python -m flows.cli watermark detect {image}" in captured.out
    assert f"{image}: watermarked (32/32 bits match)" in captured.out
    assert f"job {job_id} SUCCEEDED" in captured.err


@pytest.mark.slow
def test_failing_command_returns_its_exit_code(
    ray_head: str, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = f"raygen-test-fail-{uuid.uuid4().hex[:8]}"

    code = submit(["prep", "--config", "/nonexistent.yaml"], address=ray_head, job_id=job_id)

    captured = capsys.readouterr()
    assert code != 0
    assert code == JobSubmissionClient(ray_head).get_job_info(job_id).driver_exit_code
    assert "/nonexistent.yaml" in captured.out  # the CLI's error, streamed from the job
    assert f"job {job_id} FAILED" in captured.err


@pytest.mark.slow
def test_no_wait_prints_the_job_id_and_explicit_address_wins_over_env(
    ray_head: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ray's client would otherwise replace the explicit address with this dead one.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    job_id = f"raygen-test-nowait-{uuid.uuid4().hex[:8]}"

    assert submit(["--help"], address=ray_head, wait=False, job_id=job_id) == 0

    err = capsys.readouterr().err
    assert job_id in err and "ray job logs --follow" in err
    monkeypatch.delenv("RAY_ADDRESS")
    client = JobSubmissionClient(ray_head)
    deadline = time.monotonic() + 60
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
