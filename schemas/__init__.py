"""Contracts every other package uses: run configs, the shard schema, the HTTP API."""

from schemas.config import (
    Config,
    ConfigError,
    DistillConfig,
    ModelRef,
    PrepConfig,
    RayConfig,
    ServeConfig,
    StorageConfig,
    TrainConfig,
    dump_config,
    load_config,
)
from schemas.errors import RaygenError

__all__ = [
    "Config",
    "ConfigError",
    "DistillConfig",
    "ModelRef",
    "PrepConfig",
    "RaygenError",
    "RayConfig",
    "ServeConfig",
    "StorageConfig",
    "TrainConfig",
    "dump_config",
    "load_config",
]
