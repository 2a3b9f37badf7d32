"""Every manifest under cluster/manifests: valid for its tool, and runs a command that exists.

A manifest is only read by `ray up` or KubeRay on a real cluster, long after a change that
broke it; these checks catch that at test time: Ray's own schema for the cluster launcher,
for RayJobs the entrypoint parsed by the real CLI parser with the config it names, and for
the RayService Serve's own schema, its import path resolved to the real app builder and
its args built into the app.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from ray import serve
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from flows import serve as serve_flow
from flows.cli import FLOW_FLAGS, build_parser
from schemas.config import DeploymentSettings, ServeConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO_ROOT / "cluster" / "manifests").glob("*.yaml"))

# Fields of KubeRay's v1 RayJobSpec / RayClusterSpec / group specs: a misspelt field is
# dropped by the API server without an error, so catch it here.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
    "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "headServiceAnnotations",
    "suspend",
    "managedBy",
    "gcsFaultToleranceOptions",
}
# KubeRay's v1 RayServiceSpec.
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2",
    "rayClusterConfig",
    "upgradeStrategy",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
    "serveService",
    "excludeHeadPodFromServeSvc",
    "managedBy",
    "rayClusterDeletionDelaySeconds",
}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "numOfHosts",
    "scaleStrategy",
    "idleTimeoutSeconds",
    "suspend",
}


def _load(path: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict), f"{path.name}: expected one mapping"
    return docs[0]


def _kind(manifest: dict[str, Any]) -> str:
    if manifest.get("kind") in ("RayJob", "RayService"):
        return manifest["kind"]
    if {"cluster_name", "provider", "available_node_types"} <= manifest.keys():
        return "ray-up"
    return "unknown"


RAYJOBS = [p for p in MANIFESTS if _kind(_load(p)) == "RayJob"]
RAY_UP = [p for p in MANIFESTS if _kind(_load(p)) == "ray-up"]
RAYSERVICES = [p for p in MANIFESTS if _kind(_load(p)) == "RayService"]


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def test_expected_manifests_exist() -> None:
    assert {
        "ray-cluster-aws.yaml",
        "rayjob-prep.yaml",
        "rayjob-train.yaml",
        "rayservice.yaml",
    } <= {p.name for p in MANIFESTS}


@pytest.mark.parametrize("path", MANIFESTS, ids=_ids(MANIFESTS))
def test_every_manifest_is_checked_here(path: Path) -> None:
    # A new kind of manifest needs its own checks in this file before it can land.
    assert _kind(_load(path)) != "unknown", f"{path.name}: no checks for this kind of manifest"


# --- KubeRay RayJobs ---------------------------------------------------------------------


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def _gpus(group: dict[str, Any]) -> int:
    containers = _containers(group["template"])
    return sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)


def _parse_entrypoint(entrypoint: str) -> tuple[str, argparse.Namespace]:
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "flows.cli"], f"entrypoint is not the raygen CLI: {argv}"
    parser = build_parser()
    try:
        args = parser.parse_args(argv[3:])
    except SystemExit:
        pytest.fail(f"the raygen CLI rejects the entrypoint {argv[3:]}")
    return argv[3], args


@pytest.mark.parametrize("path", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_fields(path: Path) -> None:
    job = _load(path)
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]

    assert job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"]
    assert spec.keys() <= RAYJOB_SPEC_FIELDS, spec.keys() - RAYJOB_SPEC_FIELDS
    assert cluster.keys() <= RAYCLUSTER_SPEC_FIELDS, cluster.keys() - RAYCLUSTER_SPEC_FIELDS
    assert cluster["headGroupSpec"].keys() <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert group.keys() <= WORKER_GROUP_FIELDS, group.keys() - WORKER_GROUP_FIELDS
    # The cluster exists for this job only: it goes once the job ends, after a grace period.
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("path", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_entrypoint_runs_a_cli_command_with_a_valid_config(path: Path) -> None:
    spec = _load(path)["spec"]
    command, args = _parse_entrypoint(spec["entrypoint"])

    assert command in FLOW_FLAGS, f"{command!r} is not a flow the CLI runs with a config"
    assert args.config, "a cluster job should name its config file"
    config_path = REPO_ROOT / args.config
    # Relative to the job's working_dir, which is the repository.
    assert config_path.parent == REPO_ROOT / "configs" and config_path.is_file(), args.config
    cls, flags = FLOW_FLAGS[command]
    values = {key: getattr(args, attr) for attr, key in flags.items()}
    load_config(cls, config_path, args.overrides, values)  # raises if a key or value is wrong


@pytest.mark.parametrize("path", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_runtime_env_ships_the_code(path: Path) -> None:
    env = yaml.safe_load(_load(path)["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)  # Ray's own validation of each field

    # The submitter pod has no checkout: a local path would not exist there.
    working_dir = env["working_dir"]
    assert urlparse(working_dir).scheme in {"https", "s3", "gs"}, working_dir
    # The stock Ray images lack the project's dependencies: install them from the same zip,
    # so code and dependencies come from one revision.
    assert f"raygen @ {working_dir}" in env["pip"]["packages"]


@pytest.mark.parametrize("path", RAYJOBS, ids=_ids(RAYJOBS))
def test_rayjob_cluster_has_gpu_workers_and_one_ray_release(path: Path) -> None:
    cluster = _load(path)["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    groups = cluster["workerGroupSpecs"]

    images = [c["image"] for c in _containers(head["template"])]
    images += [c["image"] for g in groups for c in _containers(g["template"])]
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray" and tag.split("-")[0] == cluster["rayVersion"], image

    gpu_groups = [g for g in groups if _gpus(g) > 0]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        for container in _containers(group["template"]):
            resources = container["resources"]
            # Kubernetes rejects a GPU request that differs from its limit.
            gpu_request = resources.get("requests", {}).get("nvidia.com/gpu")
            assert gpu_request in (None, resources["limits"].get("nvidia.com/gpu"))


def test_train_job_fits_its_workers() -> None:
    # Ray Train waits forever for GPUs the cluster cannot have.
    spec = _load(REPO_ROOT / "cluster" / "manifests" / "rayjob-train.yaml")["spec"]
    command, args = _parse_entrypoint(spec["entrypoint"])
    cls, flags = FLOW_FLAGS[command]
    values = {key: getattr(args, attr) for attr, key in flags.items()}
    config = load_config(cls, REPO_ROOT / args.config, args.overrides, values)
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]

    assert config.use_gpu
    assert sum(g["maxReplicas"] * _gpus(g) for g in groups) >= config.num_workers


# --- KubeRay RayService ------------------------------------------------------------------


def _serve_app(path: Path) -> Any:
    """The one Serve application of the RayService, checked against Serve's own schema."""
    serve_config = ServeDeploySchema.model_validate(
        yaml.safe_load(_load(path)["spec"]["serveConfigV2"])
    )
    [app] = serve_config.applications
    return app


def _serve_config(app: Any) -> ServeConfig:
    """The ServeConfig the app builder makes of the app's args (the config path is relative
    to the working_dir: the repository)."""
    args = dict(app.args)
    config_path = REPO_ROOT / args.pop("config")
    assert config_path.parent == REPO_ROOT / "configs" and config_path.is_file(), config_path
    return load_config(ServeConfig, config_path, [f"{key}={value}" for key, value in args.items()])


@pytest.mark.parametrize("path", RAYSERVICES, ids=_ids(RAYSERVICES))
def test_rayservice_fields_and_ray_release(path: Path) -> None:
    service = _load(path)
    spec = service["spec"]
    cluster = spec["rayClusterConfig"]
    assert service["apiVersion"] == "ray.io/v1" and service["metadata"]["name"]
    assert spec.keys() <= RAYSERVICE_SPEC_FIELDS, spec.keys() - RAYSERVICE_SPEC_FIELDS
    assert cluster.keys() <= RAYCLUSTER_SPEC_FIELDS, cluster.keys() - RAYCLUSTER_SPEC_FIELDS
    assert cluster["headGroupSpec"].keys() <= HEAD_GROUP_FIELDS
    groups = cluster["workerGroupSpecs"]
    for group in groups:
        assert group.keys() <= WORKER_GROUP_FIELDS, group.keys() - WORKER_GROUP_FIELDS
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    images = [c["image"] for c in _containers(cluster["headGroupSpec"]["template"])]
    images += [c["image"] for g in groups for c in _containers(g["template"])]
    releases = {_load(p)["spec"]["rayClusterSpec"]["rayVersion"] for p in RAYJOBS}
    for image in images:
        repo, _, tag = image.partition(":")
        assert repo == "rayproject/ray" and tag.split("-")[0] == cluster["rayVersion"], image
    assert cluster["rayVersion"] in releases
    assert [g for g in groups if _gpus(g) > 0], "no worker group requests nvidia.com/gpu"


@pytest.mark.parametrize("path", RAYSERVICES, ids=_ids(RAYSERVICES))
def test_rayservice_import_path_is_the_app_builder_and_its_args_validate(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = _serve_app(path)
    module, _, attr = app.import_path.partition(":")
    assert getattr(importlib.import_module(module), attr) is serve_flow.app_builder

    config = _serve_config(app)  # raises if a key or value is wrong
    models = [config.bundle, config.refiner, config.video and config.video.bundle]
    assert all(model is not None and model.uri.startswith("s3://") for model in models), models
    assert config.output.startswith("s3://")

    # What Serve does with it: call the builder with the args, from the working_dir, with
    # the pods' environment (the API keys' variable set from the secret).
    monkeypatch.chdir(REPO_ROOT)
    if config.api_keys_env is not None:
        monkeypatch.setenv(config.api_keys_env, "rk-manifest-test")
    assert isinstance(serve_flow.app_builder(app.args), serve.Application)

    env = app.runtime_env
    RuntimeEnv(**env)
    assert urlparse(env["working_dir"]).scheme in {"https", "s3", "gs"}, env["working_dir"]
    assert f"raygen @ {env['working_dir']}" in env["pip"]["packages"]


@pytest.mark.parametrize("path", RAYSERVICES, ids=_ids(RAYSERVICES))
def test_rayservice_stages_fit_the_gpu_workers(path: Path) -> None:
    config = _serve_config(_serve_app(path))
    assert config.video is not None
    stages: list[DeploymentSettings] = [
        *(getattr(config.deployments, name) for name in type(config.deployments).model_fields),
        *(
            getattr(config.video.deployments, n)
            for n in type(config.video.deployments).model_fields
        ),
        *(stage.deployment for stage in config.super_resolution),
    ]

    def most(settings: DeploymentSettings) -> int:
        return (
            settings.num_replicas
            if settings.autoscaling is None
            else settings.autoscaling.max_replicas
        )

    # Every stage at its most replicas must find GPUs, or autoscaling stalls at a pending
    # replica; and a stage on cuda must ask for a GPU.
    groups = _load(path)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = sum(g["maxReplicas"] * _gpus(g) for g in groups)
    assert sum(most(s) * s.num_gpus for s in stages) <= gpus
    assert config.bundle.device.startswith("cuda") and config.deployments.base.num_gpus >= 1
    assert config.video.deployments.denoiser.num_gpus >= 1


# --- ray up (cluster launcher) -------------------------------------------------------------


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_config_passes_rays_schema(path: Path) -> None:
    # What `ray up` does first: fill in the provider's defaults, then validate.
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_node_types(path: Path) -> None:
    config = _load(path)
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    assert config["head_node_type"] in types
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu, "expected a GPU and a CPU worker group"
    for t in gpu:
        # AWS's GPU families are g* and p*; a GPU count on a CPU instance never schedules.
        assert t["node_config"]["InstanceType"][0] in "gp", t["node_config"]["InstanceType"]
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], t
        assert t["max_workers"] >= 1


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_setup_installs_the_project(path: Path) -> None:
    config = _load(path)
    # file_mounts map a node path to a local one, relative to where `ray up` runs: the
    # repository root.
    checkouts = [
        remote
        for remote, local in config["file_mounts"].items()
        if (REPO_ROOT / local / "pyproject.toml").is_file()
    ]
    assert checkouts, "no file_mount copies the repository to the nodes"

    installs = [shlex.split(c) for c in config["setup_commands"]]
    assert any(
        argv[:2] == ["pip", "install"] and set(argv) & set(checkouts) for argv in installs
    ), f"no setup command pip-installs {checkouts}"


@pytest.mark.parametrize("path", RAY_UP, ids=_ids(RAY_UP))
def test_ray_up_pins_the_same_ray_release_as_the_rayjobs(path: Path) -> None:
    docker = _load(path)["docker"]
    images = [docker["image"], docker["head_image"]]
    images += [
        t["docker"]["worker_image"]
        for t in _load(path)["available_node_types"].values()
        if "worker_image" in t.get("docker", {})
    ]
    releases = {_load(p)["spec"]["rayClusterSpec"]["rayVersion"] for p in RAYJOBS}
    for image in images:
        assert image.partition(":")[2].split("-")[0] in releases, image
