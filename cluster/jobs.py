"""Run any raygen command on a Ray cluster as a Ray Job (the Jobs SDK, nothing home-made).

The job runs ``python -m flows.cli <argv...>`` on the head node with this repository as its
``working_dir``, so the top-level packages import on every worker; inside the job Ray sets
``$RAY_ADDRESS`` and ``init_ray`` connects to the cluster instead of starting a local Ray.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

from schemas.errors import RaygenError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Uploaded with every job, so only source and configs: not history, local environments,
# data written by local runs or caches. Ray also skips what .gitignore lists.
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "raygen-data",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
]

# Ray's Jobs client lets these override an explicit address; see `_client`.
_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# A head that has just started may not know its node's job agent yet: its Jobs API waits 10 s
# for one, then answers 500 with this and asks to try again later. No job exists then.
_NO_AGENT_YET = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def project_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """The project's pip requirements, read from ``[project.dependencies]``."""
    with pyproject.open("rb") as file:
        return list(tomllib.load(file)["project"]["dependencies"])


def entrypoint(argv: list[str]) -> str:
    """The shell command a job runs: the raygen CLI with ``argv``, each argument quoted."""
    return shlex.join(["python", "-m", "flows.cli", *argv])


def runtime_env(
    pip: list[str] | None = None, env_vars: dict[str, str] | None = None
) -> dict[str, object]:
    """The job's runtime_env: this repository as working_dir, plus opt-in pip and env vars.

    ``pip`` is off by default: on a cluster whose image already has the project's
    dependencies, Ray would still build a new environment per node and distinct list (where
    Ray runs from a virtualenv it copies the whole virtualenv first: ~20 s for this project's
    2.3 GB one). Pass ``project_requirements()`` for a cluster that lacks them.
    ``env_vars`` are stored with the job and shown by the dashboard and `ray job list`:
    nothing is forwarded unless given here, and secrets belong in the cluster's own
    credentials (instance or pod role), not here.
    """
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise RaygenError(
            f"{REPO_ROOT} is not a raygen source checkout: submitting a job uploads the "
            "repository as the job's working_dir, so run it from a checkout"
        )
    env: dict[str, object] = {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES}
    if pip:
        env["pip"] = {"packages": list(pip), "pip_check": False}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def submit(
    argv: list[str],
    *,
    address: str | None = None,
    wait: bool = True,
    pip: list[str] | None = None,
    env_vars: dict[str, str] | None = None,
    job_id: str | None = None,
) -> int:
    """Submit ``raygen <argv...>`` as a Ray Job; with ``wait``, stream its logs until it ends.

    ``address`` is the cluster's Jobs API, i.e. its dashboard (``http://head:8265``; a bare
    ``host:port`` means the same); default ``$RAY_API_SERVER_ADDRESS``, then ``$RAY_ADDRESS``.
    Returns 0 when the job succeeded (or was only submitted), non-zero otherwise. Job logs
    go to stdout, raygen's own lines (job id, final status) to stderr.
    """
    if not argv:
        raise RaygenError("nothing to submit: give a raygen command, e.g. `prep --config ...`")
    client = _client(address)
    job = {"entrypoint": entrypoint(argv), "runtime_env": runtime_env(pip, env_vars)}
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            submission_id = client.submit_job(**job, submission_id=job_id)
            break
        except RuntimeError as err:
            if _NO_AGENT_YET not in str(err) or time.monotonic() > deadline:
                raise
            _log("the cluster's job agent is not up yet (a head that just started): retrying")
    _log(f"submitted job {submission_id} to {client.get_address()}")
    if not wait:
        follow = f"ray job logs --follow --address {client.get_address()} {submission_id}"
        _log(f"follow it with: {follow}")
        return 0
    try:
        asyncio.run(_stream_logs(client, submission_id))
    except KeyboardInterrupt:
        client.stop_job(submission_id)
        _log(f"interrupted: asked Ray to stop job {submission_id}")
        return 130
    info = client.get_job_info(submission_id)
    # The message's first line says why; the rest repeats the logs already streamed.
    reason = info.message.splitlines()[0] if info.message else ""
    _log(f"job {submission_id} {info.status.value}" + (f": {reason}" if reason else ""))
    if info.status == JobStatus.SUCCEEDED:
        return 0
    # The command's own exit code when it ran (2: a user error); 1 when it never ran or
    # was stopped.
    return info.driver_exit_code or 1


def _client(address: str | None) -> JobSubmissionClient:
    address = address or next(
        (os.environ[name] for name in _ADDRESS_ENV_VARS if os.environ.get(name)), None
    )
    if not address:
        raise RaygenError(
            "no Ray cluster to submit to: pass an address (http://<head>:8265) or set $RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    # Ray's client replaces even an explicit address with $RAY_API_SERVER_ADDRESS or
    # $RAY_ADDRESS; hide them while it resolves ours. It keeps the address it resolved.
    with _env_without(_ADDRESS_ENV_VARS):
        return JobSubmissionClient(address)


@contextmanager
def _env_without(names: tuple[str, ...]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


async def _stream_logs(client: JobSubmissionClient, submission_id: str) -> None:
    # Ray's tail ends when the job reaches a terminal state.
    async for chunk in client.tail_job_logs(submission_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _log(line: str) -> None:
    print(f"raygen: {line}", file=sys.stderr, flush=True)
