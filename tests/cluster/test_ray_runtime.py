"""cluster/ray_runtime.py on a real local Ray, and its errors for addresses that don't answer."""

from __future__ import annotations

import socket
import time

import pytest
import ray

from cluster.ray_runtime import init_ray
from schemas.config import RayConfig


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@ray.remote
def _double(x: int) -> int:
    return 2 * x


def test_local_init_uses_config(no_ray: None) -> None:
    init_ray(RayConfig(num_cpus=1, num_gpus=0, namespace="raygen-test"))

    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 1
    assert ray.cluster_resources().get("GPU", 0) == 0
    assert ray.get_runtime_context().namespace == "raygen-test"
    assert ray.get(_double.remote(21)) == 42


def test_init_is_idempotent(no_ray: None) -> None:
    init_ray(RayConfig(num_cpus=1))
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
