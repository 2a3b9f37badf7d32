"""Node loss in every job, on a real multi-node Ray on loopback (`ray.cluster_utils.Cluster`,
as Ray's own suites test it): a head with no work resources (Serve's controller and proxy,
Ray Train's controller, the drivers' side) and two workers advertising one fake GPU each, so
that placement goes by `num_gpus` as on a GPU cluster. The models still run on CPU: a fake
GPU is a resource to schedule by, and each stage's `device` stays `cpu`.

Each test removes the worker node that holds the work it is about (its processes SIGKILLed,
its objects lost, as a spot instance vanishes) and checks what a user would: prep writes every
valid input exactly once; training restarts from its last checkpoint on the nodes left and
ends at the right step with the losses it had; serving answers the requests in flight with a
503 and Retry-After, runs the replica again on the surviving node and autoscales onto a node
that joins.

One cluster for the module (seconds to start); this process leaves the session's Ray for it
and joins the session's Ray again afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray._private import ray_constants
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from flows.models import build_tiny_bundles
from flows.prep import run_prep
from flows.serve import APP_NAME, build_app
from flows.train import run_train
from schemas.config import PrepConfig, ServeConfig, TrainConfig, load_config
from schemas.shards import LATENT_MEAN, QUARANTINE_DIR, REASON, SHARDS_DIR, SOURCE_URI, Manifest
from tests.conftest import METRICS_REPORT_INTERVAL_MS, _connect, free_port

pytestmark = [
    pytest.mark.slow,
    # Serve deprecates setting metrics_interval_s (in favour of environment variables that
    # it does not read yet) and warns each time it validates the config.
    pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning"),
]

# Each worker node: one fake GPU, and CPUs for the stages beside it (the machine's 2 cores
# are shared by every node; Ray only counts them).
WORKER_CPUS = 2
# A replica or worker lost with its node starts again elsewhere: a process that imports
# torch and loads its models, on a busy 2-core machine.
RESTART_S = 90


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(poll_s)


class GpuCluster:
    """The module's cluster: its head and the worker nodes alive now."""

    def __init__(self, root: Path) -> None:
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "temp_dir": str(root),
                # The State API, which Ray Train's controller polls.
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "_system_config": {"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
            },
        )
        self.head_id = self.cluster.head_node.node_id
        self.workers()

    def add_worker(self) -> str:
        """A worker node with one fake GPU: its node id, once it is alive."""
        node = self.cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=1)
        self.cluster.wait_for_nodes()
        return node.node_id

    def workers(self, count: int = 2) -> list[str]:
        """At least ``count`` worker nodes alive (adding what is missing): their ids."""
        while len(self.cluster.worker_nodes) < count:
            self.add_worker()
        return [node.node_id for node in self.cluster.worker_nodes]

    def remove(self, node_id: str) -> None:
        """The node's processes SIGKILLed, as when its machine vanishes: Ray's own and its
        workers (the raylet's children), which `remove_node` leaves to notice by themselves
        and which meanwhile finish what they were running."""
        [node] = [node for node in self.cluster.worker_nodes if node.node_id == node_id]
        [raylet] = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
        for pid in _children(raylet.process.pid):
            os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)

    def metrics(self, node_id: str) -> str:
        """Ray's Prometheus metrics endpoint of one node, as text."""
        [node] = [node for node in ray.nodes() if node["NodeID"] == node_id]
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()

    def shutdown(self) -> None:
        self.cluster.shutdown()


def _children(parent: int) -> list[int]:
    """The processes whose parent is ``parent``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def node_of(actor: ray.actor.ActorHandle) -> str:
    """The id of the node an actor runs on (asked of the actor itself)."""
    return ray.get(
        actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()),
        timeout=30,
    )


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[GpuCluster]:
    was_connected = ray.is_initialized()
    ray.shutdown()
    # Ray puts unix sockets under its temp dir; their paths must stay under ~107 bytes.
    root = Path(f"/tmp/rgc-{uuid.uuid4().hex[:8]}")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        gpus = GpuCluster(root)
        try:
            ray.init(address=gpus.cluster.address, logging_level="ERROR", log_to_driver=False)
            yield gpus
        finally:
            ray.shutdown()
            gpus.shutdown()
            shutil.rmtree(root, ignore_errors=True)
    if was_connected:
        _connect(request.getfixturevalue("session_ray"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2i"])


# ---- serve -------------------------------------------------------------------------------

SIDE = 32
# Enough steps that a request spends most of its time in the base stage, and a batch there
# lasts long enough to lose its node in the middle of it.
NUM_STEPS = 60
REQUEST_TIMEOUT_S = 30
RETRY_AFTER_S = 1
# The server answers every request by its time limit (504 at worst); a client still
# waiting well after that has hung.
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 15
# Requests in flight per base replica that the autoscaler aims for: the node-loss phase's
# clients stay below it, the scale-up phase's go well above it.
TARGET_ONGOING = 4
STEADY_CLIENTS = 3
BUSY_CLIENTS = 8


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

    def __enter__(self) -> Load:
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


def base_requests_started(url: str) -> int:
    """Requests the base replica has started denoising (it counts them as a batch starts)."""
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=CLIENT_TIMEOUT_S) as response:
        return json.load(response)["base"]["requests"]


def base_replica_states() -> dict[str, int]:
    """Replicas of the base stage by state, as the Serve controller reports them."""
    states = serve.status().applications[APP_NAME].deployments["base"].replica_states
    return {str(state): count for state, count in states.items() if count}


def base_replicas() -> dict[str, str]:
    """The live base replicas: their actors' names -> their nodes' ids."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#base#"
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    ]
    replicas = {}
    for name in names:
        try:
            replicas[name] = node_of(ray.get_actor(name, namespace="serve"))
        except (ValueError, ray.exceptions.RayActorError):  # gone meanwhile
            continue
    return replicas


def replica_calls(gpus: GpuCluster, node_id: str, deployment: str) -> dict[str, float]:
    """Calls each replica of ``deployment`` on a node has answered, by replica id (the end of
    its actor's name), from Serve's own per-replica counter on the node's metrics endpoint
    (replicas report every few seconds: METRICS_REPORT_INTERVAL_MS)."""
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(gpus.metrics(node_id)):
        for sample in family.samples:
            if (
                sample.name == "ray_serve_deployment_request_counter_total"
                and sample.labels.get("deployment") == deployment
            ):
                replica = sample.labels["replica"]
                calls[replica] = calls.get(replica, 0.0) + sample.value
    return calls


@pytest.fixture(scope="module")
def server(cluster: GpuCluster, bundles, tmp_path_factory) -> Iterator[str]:
    """The graph with its base stage on a GPU each (autoscaling between one and two replicas
    on a target the steady clients stay below), its other model stages on the workers' CPUs,
    and what holds no model (ingress, graph) on the head."""
    on_head = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01}}
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
                "ingress": on_head,
                "graph": on_head,
                "text_encoder": stage,
                "base": {
                    **stage,
                    "num_gpus": 1,
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
    cluster.workers()
    port = free_port()
    # One proxy, on the head: every node of this cluster shares the machine's loopback.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    # No graceful Serve shutdown: the cluster goes with the module.


# ---- prep --------------------------------------------------------------------------------

NUM_IMAGES = 48
BROKEN = {"broken_empty.jpg": "empty_file", "broken_truncated.png": "truncated"}


def _corpus(folder: Path) -> list[str]:
    """Valid photographs of several sizes (so several buckets) and two broken files: the
    valid ones' names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    names = []
    for index in range(NUM_IMAGES):
        height, width = [(48, 64), (64, 48), (56, 56)][index % 3]
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)  # (H, W, 3)
        name = f"photo_{index:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        (folder / f"photo_{index:03d}.txt").write_text(f"photograph number {index}")
        names.append(name)
    png = (folder / names[0]).read_bytes()
    (folder / "broken_empty.jpg").write_bytes(b"")
    (folder / "broken_truncated.png").write_bytes(png[: len(png) // 2])
    return names


def _written(output: Path, folder: str) -> list[dict[str, Any]]:
    """Every row of the written tables under ``output/folder`` (not temp files)."""
    rows: list[dict[str, Any]] = []
    for path in sorted((output / folder).rglob("*.parquet")):
        if not path.name.startswith("."):
            rows += pq.read_table(path).to_pylist()
    return rows


def _alive_actor_nodes(class_part: str) -> dict[str, str]:
    """Alive actors whose class name holds ``class_part``: actor id -> node id."""
    actors = list_actors(filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if class_part in a.class_name}


@dataclass(frozen=True)
class LostNodePrep:
    output: Path
    valid: list[str]  # the valid inputs' names
    written_before: int  # rows written when the node was lost
    manifest: Manifest


@pytest.fixture(scope="module")
def prep_with_a_lost_node(cluster, bundles, tmp_path_factory) -> LostNodePrep:
    """`raygen prep` of a small corpus, its model stage's node lost after the first rows are
    written (the small corpus' one model actor holding a GPU): the prep test checks it, and
    the training test trains on its shards."""
    cluster.workers()
    root = tmp_path_factory.mktemp("prep")
    valid = _corpus(root / "corpus")
    output = root / "shards"
    config = load_config(
        PrepConfig,
        values={
            "input": str(root / "corpus"),
            "output": str(output),
            "bundle.uri": str(bundles["t2i"]),
            # Small batches and files: the job is many small steps, so the node is lost
            # in the middle of it.
            "decode.resources.batch_size": 2,
            "encode.resources.batch_size": 2,
            # The text and latent encoders, half a GPU each: on a small corpus one actor
            # holds both (and the filters), on one GPU.
            "encode.resources.num_gpus": 0.5,
            "rows_per_file": 4,
        },
        # Images only, with their own captions: no video, captioner or CLIP scorer models.
        overrides=["video_bundle=null", "caption.model=null", "filters.scorer=null"],
    )
    results: list[Manifest] = []
    errors: list[BaseException] = []

    def prep() -> None:
        try:
            results.append(run_prep(config))
        except BaseException as err:  # shown by the assertion below
            errors.append(err)

    thread = threading.Thread(target=prep)
    thread.start()
    # Lost as soon as the stage has written its first rows: most are still to encode.
    wait_for(
        lambda: _written(output, SHARDS_DIR) or not thread.is_alive(),
        RESTART_S,
        "the first shard written",
        poll_s=0.02,
    )
    [node] = _alive_actor_nodes("ModelStages").values()
    written_before = len(_written(output, SHARDS_DIR))
    cluster.remove(node)
    thread.join(timeout=300)
    assert not thread.is_alive(), "prep did not finish after its node was lost"
    assert not errors, errors
    return LostNodePrep(output, valid, written_before, results[0])


def test_prep_loses_the_node_of_its_model_stage_and_writes_every_input_once(
    prep_with_a_lost_node,
):
    """The node running prep's model stage vanishes while it encodes: Ray Data starts the
    actor again on the other GPU node and retries what was lost (its own actor restarts and
    task retries), and the job ends with every valid input written exactly once and the
    broken files quarantined with their reasons, as an undisturbed run ends."""
    run = prep_with_a_lost_node
    print(f"{run.written_before} rows written before the node was lost")
    assert 0 < run.written_before < NUM_IMAGES, "the node was not lost mid-job"
    shards = _written(run.output, SHARDS_DIR)
    assert sorted(Path(row[SOURCE_URI]).name for row in shards) == sorted(run.valid)
    assert all(np.isfinite(row[LATENT_MEAN]).all() for row in shards)
    quarantine = _written(run.output, QUARANTINE_DIR)
    assert {Path(row[SOURCE_URI]).name: row[REASON] for row in quarantine} == BROKEN
    assert run.manifest.num_written == NUM_IMAGES


# ---- train -------------------------------------------------------------------------------


def _metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_training_loses_a_workers_node_and_restarts_from_its_checkpoint(
    cluster, bundles, prep_with_a_lost_node, tmp_path
):
    """Two training workers, one per worker node (each takes all of a node's CPUs). One's
    node vanishes mid-run; a node joins in its place, as a cluster's autoscaler adds one, and
    FailureConfig restarts the group there from the last checkpoint: the run ends at its
    step count, and the steps run again after the restart have the losses they had."""
    cluster.workers()
    output = tmp_path / "run"
    config = load_config(
        TrainConfig,
        values={
            "data": str(prep_with_a_lost_node.output),
            "output": str(output),
            "bundle.uri": str(bundles["t2i"]),
            "num_workers": 2,
            "cpus_per_worker": WORKER_CPUS,
            "batch_size": 4,
            "max_steps": 6,
            "checkpoint_every": 2,
            "sample_every": 3,
            # Records sent every step, so the losses before the loss of the node are known.
            "report_every_s": 0,
        },
    )
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(run_train(config)))
    thread.start()
    wait_for(
        lambda: (output / "metrics.jsonl").exists() and len(_metrics(output)) >= 3,
        RESTART_S * 2,
        "training reached step 3",
    )
    before = {r["step"]: r["loss"] for r in _metrics(output)}
    nodes = set(_alive_actor_nodes("RayTrainWorker").values())
    assert len(nodes) == 2 and cluster.head_id not in nodes, nodes
    cluster.remove(sorted(nodes)[0])
    cluster.workers()  # the node that joins in its place
    thread.join(timeout=RESTART_S * 3)
    assert not thread.is_alive() and results, "the run did not finish after the node was lost"
    assert results[0].steps == 6
    records = _metrics(output)
    assert [r["step"] for r in records] == list(range(1, 7))
    [restart] = [r for r in records if "resumed_from_step" in r]
    print(f"node lost after step {max(before)}; resumed from step {restart['resumed_from_step']}")
    assert restart["resumed_from_step"] in (2, 4) and restart["resumed_from_step"] <= max(before)
    assert restart["step"] == restart["resumed_from_step"] + 1
    # The same data position, weights and optimizer state on the same number of workers: the
    # steps run twice (after the checkpoint, before the loss) have the same losses.
    for record in records:
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0
        if record["step"] in before:
            assert record["loss"] == pytest.approx(before[record["step"]], rel=1e-4)
    # What a user reads of the run: one curve, and a sample grid at each sample step.
    assert Image.open(output / "loss.png").size == (640, 360)
    assert sorted(p.name for p in (output / "samples").iterdir()) == [
        "step-0000003.png",
        "step-0000006.png",
    ]


def test_serving_loses_the_base_replicas_node_then_scales_onto_a_node_that_joins(cluster, server):
    """Under load, the node holding the only base replica vanishes: requests in flight get
    503 + Retry-After, the replica runs again on the surviving GPU node, and every later
    request succeeds. Then, under more load than one replica's target, the second replica the
    autoscaler asks for waits for a GPU until a node joins, and runs there."""
    [(replica, lost_node)] = base_replicas().items()
    [surviving_node] = set(cluster.workers()) - {lost_node}
    with Load(server, STEADY_CLIENTS) as load:
        wait_for(lambda: len(load.finished()) >= STEADY_CLIENTS, 60, "load warmed up")
        # Remove it just after a batch starts, so that requests are surely in the replica.
        started = base_requests_started(server)
        wait_for(
            lambda: base_requests_started(server) > started,
            30,
            "a base batch started",
            poll_s=0.02,
        )
        lost_at = time.monotonic()
        cluster.remove(lost_node)

        def replaced() -> bool:
            replicas = base_replicas()
            return (
                bool(replicas)
                and replica not in replicas
                and base_replica_states() == {"RUNNING": len(replicas)}
            )

        wait_for(replaced, RESTART_S, "the lost base replica runs again")
        back_at = time.monotonic()
        assert list(base_replicas().values()) == [surviving_node]
        wait_for(
            lambda: len(load.finished(since=back_at)) >= STEADY_CLIENTS,
            60,
            "requests after the replacement finished",
        )
    outcomes = load.finished()
    print(f"base replica running again {back_at - lost_at:.1f} s after its node was lost:")
    for outcome in outcomes:
        print(
            f"  {outcome.start - lost_at:+6.1f} s .. {outcome.end - lost_at:+6.1f} s: "
            f"{outcome.status} {outcome.detail if outcome.status != 200 else ''}"
        )
    for outcome in outcomes:
        assert outcome.status is not None, f"no answer: {outcome}"
    before = [outcome for outcome in outcomes if outcome.end < lost_at]
    after = [outcome for outcome in outcomes if outcome.start >= back_at]
    outage = [outcome for outcome in outcomes if outcome not in before and outcome not in after]
    assert before and all(outcome.status == 200 for outcome in before)
    # Requests in a replica of the lost node fail cleanly: 503 naming the stage, with
    # Retry-After. Ones that waited for the replacement succeed or, if it took longer than
    # their time limit, are 504s.
    for outcome in outage:
        assert outcome.status in (200, 503, 504), outcome
        if outcome.status == 503:
            assert outcome.retry_after == str(RETRY_AFTER_S), outcome
            assert "replica failed" in outcome.detail, outcome
    # The requests in the lost replica fail at once, not at their time limit (the graph
    # watches each stage call, not only the chain's last one: see ImageGraph.result); one
    # still on its way to the base (in an earlier stage, or queued) is served by the
    # replacement.
    in_flight = [outcome for outcome in outage if outcome.start < lost_at]
    assert 503 in [outcome.status for outcome in in_flight], in_flight
    assert all(outcome.status in (200, 503) for outcome in in_flight), in_flight
    for outcome in in_flight:
        if outcome.status == 503:
            assert outcome.end - lost_at < REQUEST_TIMEOUT_S / 2, outcome
    # Once the replacement runs, every request succeeds.
    assert [outcome.status for outcome in after] == [200] * len(after)

    # ---- more load than one replica's target: a second replica, on a node that joins ----
    with Load(server, BUSY_CLIENTS) as busy:
        # The autoscaler asks for it; with the one GPU left taken, it waits for a node.
        wait_for(
            lambda: sum(base_replica_states().values()) == 2,
            60,
            "the autoscaler asks for a second base replica",
        )
        time.sleep(2)
        assert base_replica_states().get("RUNNING") == 1, base_replica_states()
        joined_node = cluster.add_worker()
        wait_for(
            lambda: base_replica_states() == {"RUNNING": 2},
            RESTART_S,
            "a second base replica running on the joined node",
        )
        scaled_at = time.monotonic()
        assert sorted(base_replicas().values()) == sorted([surviving_node, joined_node])
        [added] = [name for name, node in base_replicas().items() if node == joined_node]
        added_id = added.rsplit("#", 1)[-1]
        # The new replica takes requests: Serve counts the calls it answered.
        wait_for(
            lambda: replica_calls(cluster, joined_node, "base").get(added_id, 0) >= 1,
            60,
            f"the base replica on the joined node ({added_id}) answered a call",
            poll_s=1,
        )
        wait_for(
            lambda: len(busy.finished(since=scaled_at)) >= BUSY_CLIENTS,
            60,
            "requests after the scale-up finished",
        )
    statuses = [outcome.status for outcome in busy.finished()]
    assert statuses == [200] * len(statuses)
