"""Start or connect to Ray: the one place a flow decides which Ray it runs on."""

from __future__ import annotations

import logging
import os
import socket

import ray

from schemas.config import RayConfig
from schemas.errors import RaygenError

# Ray's own connect loop retries for minutes on an address nobody listens on; a plain TCP
# connect answers "refused" or "unreachable" in this much time.
_PROBE_TIMEOUT_S = 5.0


def init_ray(config: RayConfig) -> None:
    """Connect to ``config.address``, else ``$RAY_ADDRESS``, else start a local Ray.

    ``$RAY_ADDRESS`` is how a command run as a Ray Job lands on its cluster: the job
    supervisor sets it. Does nothing if Ray is already initialised in this process.
    """
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # "local" rather than None: None would attach to the last `ray start` on this
        # machine (recorded under /tmp/ray), which a user running a local flow didn't ask for.
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            namespace=config.namespace,
            # The dashboard serves the State API, which Ray Train's controller polls (and
            # users read progress from); without it Train logs a warning every second.
            include_dashboard=True,
            logging_level=logging.WARNING,
        )
        return
    if address.startswith(("http://", "https://")):
        raise RaygenError(
            f"Ray address {address!r} is a dashboard (Jobs API) URL: submit to it with "
            "`raygen submit`, or give the cluster address (host:6379, ray://host:10001, 'auto')"
        )
    if address != "auto":
        _probe(address)
    try:
        ray.init(address=address, namespace=config.namespace, logging_level=logging.WARNING)
    except ConnectionError as err:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE") != "token":
            # Ray sends its token to an explicit address only when told to; without it a
            # token-auth cluster (the default where ~/.ray/auth_token exists) refuses us.
            hint = (
                "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and "
                "provide its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
            )
        raise ConnectionError(f"cannot connect to Ray at {address!r}: {err}{hint}") from err


def shutdown_ray() -> None:
    """Disconnect this process from Ray (and stop it if this process started it)."""
    ray.shutdown()


def _probe(address: str) -> None:
    """Fail fast, naming the address, when nothing accepts connections there."""
    host_port = address.removeprefix("ray://")
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise RaygenError(f"Ray address {address!r}: expected host:port, ray://host:port or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConnectionError(f"cannot connect to Ray at {address!r}: {err}") from err
