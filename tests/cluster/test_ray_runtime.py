"""cluster/ray_runtime.py on a real local Ray, and its errors for addresses that don't answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import ray

from cluster.ray_runtime import _QUIET_ENV, VERBOSE_ENV, init_ray
from schemas.config import RayConfig
from tests.conftest import REPO, SessionRay


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@ray.remote
def _double(x: int) -> int:
    return 2 * x


def test_local_init_uses_config_and_a_second_init_keeps_it(no_ray: None) -> None:
    # One test for both: each local Ray start costs seconds of a 2-core machine.
    init_ray(RayConfig(num_cpus=1, num_gpus=0, namespace="raygen-test"))

    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 1
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert ray.get_runtime_context().namespace == "raygen-test"
    assert ray.get(_double.remote(21)) == 42
    node_id = ray.get_runtime_context().get_node_id()

    init_ray(RayConfig(num_cpus=2))  # already initialised: keeps the running Ray

    assert ray.get_runtime_context().get_node_id() == node_id
    assert ray.cluster_resources()["CPU"] == 1


def test_unreachable_address_fails_fast_and_names_it(no_ray: None) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()

    with pytest.raises(ConnectionError, match=address):
        init_ray(RayConfig(address=address))

    assert time.monotonic() - start < 10
    assert not ray.is_initialized()


def test_ray_address_env_is_used(no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # How a command run as a Ray Job finds its cluster; a dead one proves it was not ignored
    # in favour of a local Ray.
    address = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)

    with pytest.raises(ConnectionError, match=address):
        init_ray(RayConfig())


def test_config_address_wins_over_env(no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_closed_port()}")
    address = f"ray://127.0.0.1:{_closed_port()}"

    with pytest.raises(ConnectionError, match=address):
        init_ray(RayConfig(address=address))


def test_dashboard_url_is_a_user_error(no_ray: None) -> None:
    with pytest.raises(ValueError, match="raygen submit"):
        init_ray(RayConfig(address="http://127.0.0.1:8265"))


def test_address_without_port_is_a_user_error(no_ray: None) -> None:
    with pytest.raises(ValueError, match="head-node"):
        init_ray(RayConfig(address="head-node"))


# A driver as a raygen command runs one: console chosen first, then a local Ray. Ray Data's
# issue detector gives its advice, a worker prints, says a line through the driver's console,
# then another worker fails.
_DRIVER = """
import logging, sys, time
import ray
from cluster.ray_runtime import DriverConsole, configure_console, init_ray
from schemas.config import RayConfig

configure_console(verbose=sys.argv[1] == "verbose")
init_ray(RayConfig(num_cpus=1))
marker = sys.argv[2]

import ray.data
detector = "ray.data._internal.issue_detection.issue_detector_manager"
logging.getLogger(detector).warning(f"consider setting memory= {marker}")

@ray.remote
def work(console):
    print(f"printed by a worker {marker}")
    console.say(f"said by a worker {marker}")

@ray.remote
def fail():
    raise ValueError(f"a worker's error {marker}")

console = DriverConsole()
with console.shown():
    ray.get(work.remote(console))
time.sleep(3)  # Ray forwards worker output every few hundred ms when it forwards at all
ray.get(fail.remote())
"""


def _run_driver(mode: str, marker: str) -> subprocess.CompletedProcess[str]:
    """The driver, connected to the session's Ray through $RAY_ADDRESS (as a Ray Job's command
    is): it needs no cluster of its own to show what reaches its console."""
    # As a fresh shell starts it: without what an earlier test's quiet CLI call left in this
    # process's environment (configure_console sets those variables for its Ray).
    env = {k: v for k, v in os.environ.items() if k != VERBOSE_ENV and k not in _QUIET_ENV}
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, mode, marker],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_quiet_console_keeps_worker_output_in_rays_logs_but_shows_errors(
    ray_local: None, session_ray: SessionRay
) -> None:
    marker = uuid.uuid4().hex
    result = _run_driver("quiet", marker)
    console = result.stdout + result.stderr

    assert f"said by a worker {marker}" in result.stdout  # raygen's own line, relayed
    assert f"printed by a worker {marker}" not in console
    # Ray Data's advice on memory requests, which a stage's resources do not take, is in
    # its log file (16 lines every 30 s on a slow machine pushed the demo past two screens).
    assert f"consider setting memory= {marker}" not in console
    # The failure reaches the user with the worker's traceback, and the command fails.
    assert result.returncode != 0
    assert f"ValueError: a worker's error {marker}" in result.stderr
    assert ", in fail\n" in result.stderr  # the worker's frame
    # What the worker printed is in Ray's log files.
    logs = session_ray.logs.glob("worker-*.out")
    assert any(marker in path.read_text(errors="replace") for path in logs)


def test_verbose_console_shows_worker_output(ray_local: None) -> None:
    marker = uuid.uuid4().hex
    result = _run_driver("verbose", marker)

    assert f"printed by a worker {marker}" in result.stdout
    assert f"said by a worker {marker}" in result.stdout
    assert f"consider setting memory= {marker}" in result.stderr
    assert f"ValueError: a worker's error {marker}" in result.stderr
