"""Shared fixtures.

S3: a real S3-compatible HTTP server (moto's server mode) in a subprocess on loopback,
with dummy credentials in ``os.environ`` so Ray workers started later inherit them. No
in-process patching of boto3 or pyarrow: the code under test talks HTTP to a server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from schemas.config import StorageConfig

REPO = Path(__file__).parents[1]
S3_REGION = "us-east-1"
# Dummy values, distinctive so tests can assert they never show up in messages.
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "raygen-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "raygen-test-secret-key",
    "AWS_DEFAULT_REGION": S3_REGION,
    # No IMDS probing: off EC2 it only costs seconds before failing.
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Would override or confuse the dummy credentials if a developer has them set.
S3_UNSET_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def pytest_configure(config: pytest.Config) -> None:
    # Ray Train's controller polls its workers every 2 s, so a finished or a killed worker is
    # noticed up to 2 s late in each of the suite's training runs. Set before any Ray starts
    # (the session's, or a CLI's in a subprocess), so every controller reads it.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Each run's worker group gets a PreemptionWatcher actor polling for node drains: one
    # more process (~3 CPU-s to start) per run, and a single local node is never drained.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # A Ray Job's entrypoint runs `python` from the PATH its Ray started with: make it this
    # interpreter (the session's Ray serves tests/cluster/test_jobs.py's jobs).
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # Ray 2.60 turns token auth on for the dashboard when ~/.ray/auth_token exists.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_pytest() -> None:
    """In the child, before exec: SIGTERM when pytest's process ends, however it ends, so
    that a killed test run leaves no server or Ray behind (`ray start --block` stops Ray on
    SIGTERM)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_until_answering(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    what: str,
    timeout_s: float,
    any_status: bool = True,
) -> None:
    """Until ``url`` answers (with 200 unless ``any_status``); fails with ``log`` if
    ``process`` exits first or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if any_status or response.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return  # any HTTP answer means it is serving
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} at {url} did not answer within {timeout_s:g} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Endpoint URL (``http://127.0.0.1:<port>``) of a moto S3 server for the whole session.

    Sets dummy AWS credentials and region in ``os.environ`` (restored at the end) so that
    this process and any subprocess started meanwhile (Ray workers) find them.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    saved = {key: os.environ.get(key) for key in (*S3_TEST_ENV, *S3_UNSET_ENV)}
    os.environ.update(S3_TEST_ENV)
    for key in S3_UNSET_ENV:
        os.environ.pop(key, None)
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_pytest,
        )
    try:
        _wait_until_answering(endpoint, process, log, "moto server", timeout_s=30)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_client(s3_server: str) -> Any:
    """A plain boto3 S3 client for the test server, to set up and inspect objects."""
    return boto3.client("s3", endpoint_url=s3_server, region_name=S3_REGION)


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """``s3://<bucket>`` of a fresh, empty bucket on the test server."""
    name = f"test-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def storage_config(s3_server: str, tmp_path: Path) -> StorageConfig:
    """A StorageConfig for the test server, with the bundle cache in this test's tmp_path."""
    return StorageConfig(
        endpoint_url=s3_server,
        region=S3_REGION,
        connect_timeout_s=2.0,
        read_timeout_s=30.0,
        cache_dir=str(tmp_path / "cache"),
    )


# How often each process reports its metrics to Ray's metrics endpoint. Every second, every
# live process (a dozen Serve replicas among them) and the agent that receives the reports
# spent ~0.1 core of the 2 on it between them; every 5 s the cost is what Ray's default of
# 10 s costs, and a test reading a metric waits seconds, not tens of them.
METRICS_REPORT_INTERVAL_MS = 5000


@dataclass(frozen=True)
class SessionRay:
    address: str  # its GCS: what a driver connects to (ray.init, $RAY_ADDRESS)
    jobs_api: str  # its dashboard, which serves the Jobs API
    logs: Path  # its log files (workers' output among them)


def _kill_session(session_id: int) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session_id:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # gone already, or not ours
            continue


@pytest.fixture(scope="session")
def session_ray(s3_server: str) -> Iterator[SessionRay]:
    """A real Ray head for the whole session (`ray start --head`, 2 CPUs like the machine),
    which the tests' processes join as drivers: started once, not once per module, since each
    start costs seconds of a 2-core machine, and a `no_ray` test only disconnects from it.

    Ports of its own (the demo's Ray runs beside it with Ray's defaults); a dashboard, for
    the Jobs API and the State API that Ray Train polls. Started after ``s3_server`` so its
    workers inherit the S3 test environment. Processes report their metrics every 5 s (not
    every 10 s), so a test reads a metric seconds after it is recorded.
    """
    # Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
    temp_dir = Path(f"/tmp/rg-{uuid.uuid4().hex[:8]}")
    temp_dir.mkdir()
    log = temp_dir / "ray-start.log"
    port, dashboard_port = free_port(), free_port()
    system_config = {"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS}
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--disable-usage-stats", "--num-cpus=2", f"--temp-dir={temp_dir}",
        f"--port={port}", "--node-ip-address=127.0.0.1",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Ray's fixed defaults, which the demo's Ray takes.
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--system-config={json.dumps(system_config)}",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        head = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_pytest,
        )  # fmt: skip
    session = SessionRay(
        f"127.0.0.1:{port}",
        f"http://127.0.0.1:{dashboard_port}",
        temp_dir / "session_latest" / "logs",
    )
    try:
        _wait_until_answering(
            f"{session.jobs_api}/api/jobs/", head, log, "Ray's Jobs API", 120, any_status=False
        )
        yield session
    finally:
        # SIGKILL to every process of its session (Ray's workers each lead a process group
        # of their own, so the head's group is not enough; one that missed its raylet's
        # end lived on). SIGTERM had `ray start --block` stop each process gracefully in
        # turn, 30 s and more after a full run, and a test run's Ray holds nothing to keep.
        _kill_session(head.pid)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _connect(session: SessionRay) -> None:
    import ray

    ray.init(address=session.address, logging_level="ERROR")


@pytest.fixture(scope="session")
def ray_local(session_ray: SessionRay) -> Iterator[None]:
    """This process connected to the session's Ray (see ``session_ray``)."""
    import ray

    _connect(session_ray)
    yield
    ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[None]:
    """No Ray in this process during the test, and no $RAY_ADDRESS; if this process was
    connected to the session's Ray, it connects again afterwards for the tests that follow."""
    import ray

    was_running = ray.is_initialized()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.shutdown()
    yield
    ray.shutdown()
    if was_running:
        _connect(request.getfixturevalue("session_ray"))


@dataclass
class BackgroundRun:
    """A command the session runs in the background, as a user runs it (a subprocess with a
    local Ray of its own, one data folder); a fixture waits for it with ``finish``."""

    command: list[str]
    data: Path
    timeout_s: float  # from its start
    process: subprocess.Popen[bytes] | None = None
    deadline: float = 0.0
    started: threading.Event = field(default_factory=threading.Event)

    @property
    def stdout(self) -> Path:
        return self.data.parent / f"{self.data.name}.stdout.txt"

    @property
    def stderr(self) -> Path:
        return self.data.parent / f"{self.data.name}.stderr.txt"

    def start(self) -> None:
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(
                [*self.command, str(self.data)], cwd=REPO, stdout=out, stderr=err
            )
        self.deadline = time.monotonic() + self.timeout_s
        self.started.set()

    def finish(self) -> tuple[int, str, str]:
        """Wait for it (started, then ended); its return code, stdout and stderr."""
        self.started.wait()
        assert self.process is not None
        try:
            returncode = self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        finally:
            stdout = self.stdout.read_text(errors="replace")
            stderr = self.stderr.read_text(errors="replace")
        return returncode, stdout, stderr

    def stop(self) -> None:
        self.started.set()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class BackgroundRuns:
    sample: BackgroundRun  # tests/sample_prep.py: the shards most tests read
    demo: BackgroundRun  # `raygen demo --quick`
    # Set when the demo may start (see ``_DEMO_WAITS_FOR``).
    demo_may_start: threading.Event = field(default_factory=threading.Event)


@pytest.fixture(scope="session")
def background_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRuns]:
    """The sample prep, then `raygen demo --quick`, one after the other in the background
    (one extra local Ray at a time on 2 cores): ``sample_run`` and ``demo_run``
    (tests/flows/conftest.py) wait for theirs. The demo also waits for ``demo_may_start``."""
    root = tmp_path_factory.mktemp("background")
    runs = BackgroundRuns(
        sample=BackgroundRun([sys.executable, "-m", "tests.sample_prep"], root / "sample", 300),
        demo=BackgroundRun(
            [sys.executable, "-m", "flows.cli", "demo", "--quick", "--data-dir"],
            root / "raygen-data",
            400,
        ),
    )
    stopping = threading.Event()

    def run_in_turn() -> None:
        for run in (runs.sample, runs.demo):
            if run is runs.demo:
                while not (runs.demo_may_start.wait(1.0) or stopping.is_set()):
                    pass
            if stopping.is_set():
                return
            run.start()
            assert run.process is not None
            run.process.wait()

    thread = threading.Thread(target=run_in_turn, name="background-runs", daemon=True)
    thread.start()
    yield runs
    stopping.set()
    for run in (runs.sample, runs.demo):
        run.stop()
    thread.join(timeout=10)


_READS_RUNS = {"sample_run", "demo_run"}
# The demo (~200 CPU-seconds) starts once the serve package's tests are done. That package's
# setup starts a score of replica processes, which keep both cores busy by themselves; most
# tests after it wait on Ray Train's and Serve's processes as much as they compute (the
# suite's timeline: 1.0 to 1.6 of the 2 cores), and the demo fills that room instead.
_DEMO_WAITS_FOR = Path(__file__).parent / "flows" / "serve"
_runs: dict[str, BackgroundRuns] = {}  # the session's, once started
_serve_package_started = threading.Event()


@pytest.fixture(scope="session", autouse=True)
def _runs_in_the_background(request: pytest.FixtureRequest) -> None:
    """The background runs start with the session's first test when a selected test reads
    them: their minutes (half of it waiting on one core) then overlap the tests that do not
    read them, which run first (pytest_collection_modifyitems), instead of adding to the
    suite."""
    items = request.session.items
    if any(_READS_RUNS.intersection(item.fixturenames) for item in items):
        runs = _runs["runs"] = request.getfixturevalue("background_runs")
        if not any(_DEMO_WAITS_FOR in item.path.parents for item in items):
            runs.demo_may_start.set()


def pytest_runtest_setup(item: pytest.Item) -> None:
    runs = _runs.get("runs")
    if runs is None or runs.demo_may_start.is_set():
        return
    if _DEMO_WAITS_FOR in item.path.parents:
        _serve_package_started.set()
    elif _serve_package_started.is_set() or _READS_RUNS.intersection(item.fixturenames):
        runs.demo_may_start.set()  # past the package, or a test that needs the runs now


# Tests that start a multi-node Ray of their own (and leave the session's while they run).
_OWN_CLUSTER = Path(__file__).parent / "chaos"
# Fixtures that start Ray (or run a job that does): a test that uses one is slow, so
# `-m "not slow"` runs without starting Ray at all.
_RAY_FIXTURES = {
    "session_ray", "ray_local", "no_ray", "sample_run", "demo_run", "tiny_bundles", "prep_shards",
}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # Tests that need Ray down run before the session's Ray starts, so `no_ray` need not
    # restart it after each of them; then the node-loss tests on a cluster of their own, for
    # the same reason (and beside the sample prep alone: their deadlines are a busy
    # machine's). Then the serve package, beside the sample prep alone (the demo waits for
    # it: _DEMO_WAITS_FOR); then the modules that read neither background run, beside the
    # demo; then the modules that read the sample prep (done first), then the demo's. Whole
    # modules move (a stable sort keeps file order), so module fixtures start once.
    reads = {
        name: {item.path for item in items if name in item.fixturenames} for name in _READS_RUNS
    }

    def order(item: pytest.Item) -> int:
        if "no_ray" in item.fixturenames:
            return 0
        if _OWN_CLUSTER in item.path.parents:
            return 1
        if item.path in reads["demo_run"]:
            return 5
        if item.path in reads["sample_run"]:
            return 4
        return 2 if _DEMO_WAITS_FOR in item.path.parents else 3

    items.sort(key=order)
