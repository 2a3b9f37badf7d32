"""What every stage replica does first: find its bundle on local disk (downloading an
``s3://`` one), its dtype, and its name in the graph. Neither diffusers nor transformers
here: each stage module imports only the ``actors/`` classes it runs.
"""

import torch
from ray import serve

from cluster.bundles import resolve_bundle
from cluster.storage import Storage
from schemas.config import ModelRef, StorageConfig


def torch_dtype(model: ModelRef) -> torch.dtype:
    return getattr(torch, model.dtype)


def local_bundle(model: ModelRef, storage: StorageConfig) -> str:
    return str(resolve_bundle(model.uri, Storage(storage)))


def deployment_name() -> str:
    """The stage's name in the graph: its deployment's (one class serves base and refiner,
    and every super-resolution stage)."""
    return serve.get_replica_context().deployment
