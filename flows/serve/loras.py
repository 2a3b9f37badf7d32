"""The adapter registry a server reads LoRAs from: a folder, local or ``s3://``, with one
subfolder per adapter holding diffusers' ``pytorch_lora_weights.safetensors`` (what
``raygen train`` with ``adapter:`` and diffusers' ``save_lora_weights`` write). An adapter's
name is its subfolder's. Adapters added to the folder are found without a restart: a
listing is reused for ``rescan_s`` seconds, and a name it lacks lists the folder again.

No torch here: the ingress lists and checks names; the base denoiser's replicas, which load
the weights, ask for a local copy (``local_dir``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.bundles import ADAPTER_FILE, ADAPTER_WEIGHTS, resolve_folder, validate_adapter
from cluster.storage import Storage
from schemas.api import LoraInfo
from schemas.config import LoraServingConfig
from schemas.errors import AdapterError, RaygenError

# The multiplexed model id of an adapter set: its names, sorted, joined (names hold no comma).
_SEPARATOR = ","


def adapter_set_key(names: Sequence[str]) -> str:
    """The id under which a replica holds these adapters together (order does not matter)."""
    return _SEPARATOR.join(sorted(names))


def adapter_set_names(key: str) -> list[str]:
    return key.split(_SEPARATOR) if key else []


class AdapterRegistry:
    """What the registry folder holds, listed at most ``rescan_s`` seconds ago."""

    def __init__(self, config: LoraServingConfig, storage: Storage) -> None:
        self.uri = config.registry.rstrip("/")
        self.rescan_s = config.rescan_s
        self.storage = storage
        self._sizes: dict[str, int] = {}
        self._listed_at = -float("inf")
        self._lock = threading.Lock()

    def sizes(self, fresh: bool = False) -> dict[str, int]:
        """Adapter name -> size in bytes of its weights, listing again when older than
        ``rescan_s`` (or ``fresh``)."""
        with self._lock:
            if fresh or time.monotonic() - self._listed_at >= self.rescan_s:
                self._sizes = self._list()
                self._listed_at = time.monotonic()
            return dict(self._sizes)

    def missing(self, names: Sequence[str]) -> list[str]:
        """Those of ``names`` the registry does not hold, after listing it again if the last
        listing lacks any of them (one added a moment ago is found)."""
        held = self.sizes()
        if all(name in held for name in names):
            return []
        held = self.sizes(fresh=True)
        return [name for name in names if name not in held]

    def infos(self) -> list[LoraInfo]:
        """``GET /v1/loras``: every adapter, with the base bundle raygen recorded for it."""
        return [
            LoraInfo(name=name, size_bytes=size, base=self._base(name))
            for name, size in sorted(self.sizes().items())
        ]

    def local_dir(self, name: str) -> Path:
        """The adapter's folder on this machine (downloaded once per content for s3://)."""
        try:
            return resolve_folder(
                Storage.join(self.uri, name), self.storage, validate_adapter, kind="adapter"
            )
        except RaygenError as err:
            raise AdapterError(name, f"not in the registry {self.uri} ({err})", 404) from None

    def _list(self) -> dict[str, int]:
        prefix = f"{self.uri}/"
        sizes = {}
        for info in self.storage.list_info(self.uri):
            name, _, rest = info.uri.removeprefix(prefix).partition("/")
            if rest == ADAPTER_WEIGHTS:
                sizes[name] = info.size
        return sizes

    def _base(self, name: str) -> str | None:
        try:
            recorded: dict[str, Any] = json.loads(
                self.storage.read_bytes(Storage.join(self.uri, name, ADAPTER_FILE))
            )
        except (ValueError, OSError):  # none recorded (an adapter from elsewhere), or unreadable
            return None
        base = recorded.get("base")
        return base if isinstance(base, str) else None
