"""The serving graph (`flows/serve/`) under load on a real local Ray Serve with a tiny
bundle: a base replica killed mid-request, and the base stage autoscaling up and back down.

One Serve app serves both tests. Its base stage autoscales between one and two replicas on
a target that the kill test's clients cannot exceed (so that test sees the outage of the
only replica) and the autoscaling test's clients do, with short report intervals, delays
and health checks so that both play out in seconds.
"""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from flows.models import build_tiny_bundles
from flows.serve import APP_NAME, build_app
from schemas.config import ServeConfig
from tests.conftest import free_port

pytestmark = [
    pytest.mark.slow,
    # Serve deprecates setting metrics_interval_s (in favour of environment variables that
    # it does not read yet) and warns each time it validates the config.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

SIDE = 32
# Enough steps that a request spends most of its time in the base stage, and a batch there
# lasts long enough to kill the replica in the middle of it.
NUM_STEPS = 60
REQUEST_TIMEOUT_S = 30
RETRY_AFTER_S = 1
# The server answers every request by its time limit (504 at worst); a client still
# waiting well after that has hung.
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 15
# Requests in flight per base replica that the autoscaler aims for: the kill test's
# clients stay below it, the autoscaling test's go well above it.
TARGET_ONGOING = 4
KILL_TEST_CLIENTS = 3
AUTOSCALING_TEST_CLIENTS = 8
# Restarting or adding a replica starts a process that imports torch and loads the bundle;
# on a busy 2-core machine that can take a while.
REPLICA_START_S = 60


@pytest.fixture(scope="module")
def server(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    bundles = build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2i"])
    stage = {"num_cpus": 0.1}
    config = ServeConfig.model_validate(
        {
            "bundle": {"uri": str(bundles["t2i"])},
            "max_height": SIDE,
            "max_width": SIDE,
            "max_sequence_length": 16,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "retry_after_s": RETRY_AFTER_S,
            "output": str(tmp_path_factory.mktemp("outputs")),
            "deployments": {
                "ingress": stage,
                "text_encoder": stage,
                "base": {
                    **stage,
                    "health_check_period_s": 1,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "target_ongoing_requests": TARGET_ONGOING,
                        "upscale_delay_s": 1,
                        "downscale_delay_s": 1,
                        "metrics_interval_s": 0.5,
                        "look_back_period_s": 2,
                    },
                },
                "vae_decode": stage,
                "safety": stage,
            },
        }
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@dataclass(frozen=True)
class Outcome:
    start: float  # time.monotonic()
    end: float
    status: int | None  # None: no answer within CLIENT_TIMEOUT_S
    retry_after: str | None
    detail: Any


def generate(url: str) -> Outcome:
    body = {
        "prompt": "a lighthouse in a storm",
        "height": SIDE,
        "width": SIDE,
        "num_inference_steps": NUM_STEPS,
        "seed": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            status, headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, payload = err.code, err.headers, err.read()
    except (TimeoutError, urllib.error.URLError) as err:  # no answer in time, or at all
        return Outcome(start, time.monotonic(), None, None, repr(err))
    if headers.get("content-type", "").startswith("application/json"):
        detail = json.loads(payload).get("detail")
    else:
        detail = payload[:300]  # not our API's JSON: e.g. a bare 500
    return Outcome(start, time.monotonic(), status, headers.get("retry-after"), detail)


class Load:
    """Clients, each sending one request after another until stopped."""

    def __init__(self, url: str, num_clients: int) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(num_clients)]

    def _client(self) -> None:
        while not self.stopping.is_set():
            outcome = generate(self.url)
            with self.lock:
                self.outcomes.append(outcome)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            # Each client finishes its request in flight, which must end in time.
            thread.join(CLIENT_TIMEOUT_S + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def finished(self, since: float = 0.0) -> list[Outcome]:
        with self.lock:
            return [outcome for outcome in self.outcomes if outcome.start >= since]


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(poll_s)


def base_requests_started(url: str) -> int:
    """Requests the base replica has started denoising (it counts them as a batch starts)."""
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=CLIENT_TIMEOUT_S) as response:
        return json.load(response)["base"]["requests"]


def base_replica_states() -> dict[str, int]:
    """Replicas of the base stage by state, as the Serve controller reports them."""
    states = serve.status().applications[APP_NAME].deployments["base"].replica_states
    return {str(state): count for state, count in states.items() if count}


def base_replica_actors() -> list[str]:
    """Names of the live base replicas' actors (Serve names them after app and deployment)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#base#"
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]


def replica_calls(deployment: str) -> dict[str, float]:
    """Calls each replica of ``deployment`` has answered, by replica id (the end of its
    actor's name), from Serve's own per-replica counter on Ray's metrics endpoint (replicas
    report every few seconds: tests/conftest.py's METRICS_REPORT_INTERVAL_MS)."""
    [node] = ray.nodes()
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "ray_serve_deployment_request_counter_total"
                and sample.labels.get("deployment") == deployment
            ):
                replica = sample.labels["replica"]
                calls[replica] = calls.get(replica, 0.0) + sample.value
    return calls


def test_killing_the_base_replica_under_load_fails_cleanly_then_recovers(server):
    [replica] = base_replica_actors()
    actor = ray.get_actor(replica, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
    with Load(server, KILL_TEST_CLIENTS) as load:
        wait_for(lambda: len(load.finished()) >= KILL_TEST_CLIENTS, 60, "load warmed up")
        # Kill just after a batch starts, so that requests are surely in the replica.
        started = base_requests_started(server)
        wait_for(
            lambda: base_requests_started(server) > started,
            30,
            "a base batch started",
            poll_s=0.02,
        )
        # A crash, not a shutdown: SIGKILL to the replica's worker process.
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            actors = base_replica_actors()
            return (
                bool(actors)
                and replica not in actors
                and base_replica_states() == {"RUNNING": len(actors)}
            )

        wait_for(replaced, REPLICA_START_S, "the killed base replica is replaced")
        back_at = time.monotonic()
        wait_for(
            lambda: len(load.finished(since=back_at)) >= KILL_TEST_CLIENTS,
            60,
            "requests after the replacement finished",
        )
    outcomes = load.finished()
    print(f"base replica replaced {back_at - killed_at:.1f} s after the kill; outcomes:")
    for outcome in outcomes:
        print(
            f"  {outcome.start - killed_at:+6.1f} s .. {outcome.end - killed_at:+6.1f} s: "
            f"{outcome.status} {outcome.detail if outcome.status != 200 else ''}"
        )
    for outcome in outcomes:
        assert outcome.status is not None, f"no answer: {outcome}"
    before = [outcome for outcome in outcomes if outcome.end < killed_at]
    after = [outcome for outcome in outcomes if outcome.start >= back_at]
    outage = [outcome for outcome in outcomes if outcome not in before and outcome not in after]
    assert before and all(outcome.status == 200 for outcome in before)
    # Requests in the replica when it died fail cleanly: 503 naming the stage, with
    # Retry-After. Ones that waited for the replacement succeed or, if it took longer than
    # their time limit, are 504s.
    for outcome in outage:
        assert outcome.status in (200, 503, 504), outcome
        if outcome.status == 503:
            assert outcome.retry_after == str(RETRY_AFTER_S), outcome
            assert "base replica failed" in outcome.detail, outcome
    in_flight = [outcome for outcome in outage if outcome.start < killed_at]
    assert 503 in [outcome.status for outcome in in_flight], in_flight
    # Once the replacement runs, every request succeeds.
    assert [outcome.status for outcome in after] == [200] * len(after)


def test_the_base_stage_scales_up_under_load_and_back_down(server):
    wait_for(lambda: base_replica_states() == {"RUNNING": 1}, 30, "one base replica at rest")
    [first] = base_replica_actors()
    with Load(server, AUTOSCALING_TEST_CLIENTS) as load:
        wait_for(
            lambda: base_replica_states().get("RUNNING", 0) == 2,
            REPLICA_START_S,
            "a second base replica running under load",
        )
        scaled_at = time.monotonic()
        [second] = set(base_replica_actors()) - {first}
        second_id = second.rsplit("#", 1)[-1]
        # The new replica takes requests: Serve counts calls it answered (under this load,
        # only denoise calls reach the base: the graph asked its size factors long ago).
        wait_for(
            lambda: replica_calls("base").get(second_id, 0) >= 1,
            60,
            f"the second base replica ({second_id}) answered a call",
            poll_s=1,
        )
        wait_for(
            lambda: len(load.finished(since=scaled_at)) >= AUTOSCALING_TEST_CLIENTS,
            60,
            "requests after the scale-up finished",
        )
    print(f"calls per base replica under load: {replica_calls('base')}")
    stopped_at = time.monotonic()
    wait_for(
        lambda: base_replica_states() == {"RUNNING": 1}, 30, "back to one base replica at rest"
    )
    print(f"scaled down {time.monotonic() - stopped_at:.1f} s after the load stopped")
    statuses = [outcome.status for outcome in load.finished()]
    assert statuses == [200] * len(statuses)
