"""Start or connect to Ray: the one place a flow decides which Ray it runs on, and how much of
Ray's and the model libraries' output reaches the console.

Quiet by default: raygen's own lines on the console, everything Ray's processes print in
Ray's log files (``/tmp/ray/session_latest/logs`` on the head node). Errors still reach the
driver: a failed task or actor raises there with the worker's traceback. ``raygen --verbose``
(``$RAYGEN_VERBOSE=1``) forwards everything, as plain Ray does.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from schemas.config import RayConfig
from schemas.errors import RaygenError

# Ray's own connect loop retries for minutes on an address nobody listens on; a plain TCP
# connect answers "refused" or "unreachable" in this much time.
_PROBE_TIMEOUT_S = 5.0

VERBOSE_ENV = "RAYGEN_VERBOSE"

# The libraries' own switches for a quiet console, as environment variables because they are
# read when each library is first imported. Set only where the user has not set them.
_QUIET_ENV = {
    # transformers' and huggingface_hub's bars ("Writing model shards", "Loading weights").
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # Warnings raised while importing diffusers' pipelines (e.g. that transformers falls back
    # to its PIL image processors without torchvision, which is the backend raygen uses).
    "TRANSFORMERS_VERBOSITY": "error",
    # Ray Data's INFO lines ("Execution plan of Dataset ...", and its progress where stdout is
    # not a terminal: a bar on one) to its log file, not the console.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
}


def is_verbose() -> bool:
    """Whether Ray's and the libraries' full output goes to the console."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_console(verbose: bool) -> None:
    """Choose the console's output before Ray's libraries or the model libraries are imported
    (the CLI calls this first). Local Ray's processes inherit the choice."""
    # Each line as it is printed, in order with errors, into a pipe or a file too (a CI log,
    # `| tee`): a progress line that arrives at exit is no progress line.
    if isinstance(sys.stdout, io.TextIOWrapper):  # not when a caller swapped in its own
        sys.stdout.reconfigure(line_buffering=True)
    if not sys.stdout.isatty():
        # Ray colours the prefix of what it forwards (the raylet's warnings reach the driver
        # even when worker output does not): escape codes in a file or a pipe.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose or is_verbose():
        os.environ[VERBOSE_ENV] = "1"
        return
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)


def init_ray(config: RayConfig) -> None:
    """Connect to ``config.address``, else ``$RAY_ADDRESS``, else start a local Ray.

    ``$RAY_ADDRESS`` is how a command run as a Ray Job lands on its cluster: the job
    supervisor sets it. Does nothing if Ray is already initialised in this process.
    """
    if ray.is_initialized():
        return
    # Worker output (print, warnings, Ray Data's and Ray Train's INFO logs, progress bars) stays
    # in the workers' log files; raygen's own lines from workers go through `DriverConsole`.
    output = {
        "log_to_driver": is_verbose(),
        "logging_level": logging.INFO if is_verbose() else logging.WARNING,
    }
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
            **output,
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
        ray.init(address=address, namespace=config.namespace, **output)
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


@ray.remote(num_cpus=0)
class _Lines:
    """Lines remote code has said, held until the driver takes them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class DriverConsole:
    """raygen's own lines from Ray tasks and actors (Ray Train's controller, training workers),
    printed by the driver: worker output does not reach it unless verbose.

    Pass the object to remote code, which calls ``say``; the driver prints inside ``shown()``.
    """

    def __init__(self) -> None:
        # On the driver's node, which lives as long as the driver: placed anywhere, it would
        # take the run down with whichever node it landed on (a 0-CPU actor goes anywhere).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._lines = _Lines.options(scheduling_strategy=here).remote()

    def say(self, line: str) -> None:
        # Awaited, so that a line said before the remote work ends is printed before the
        # driver's `shown()` block ends.
        ray.get(self._lines.add.remote(line))

    @contextmanager
    def shown(self, every_s: float = 0.5) -> Iterator[None]:
        done = threading.Event()

        def show() -> None:
            while True:
                stop = done.wait(every_s)
                for line in ray.get(self._lines.take.remote()):
                    print(line, flush=True)
                if stop:
                    return

        thread = threading.Thread(target=show, name="raygen-console", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


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
