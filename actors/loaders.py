"""Load the model a `ModelRef` names, local or s3://, the way every actor does.

The bundle is resolved (validated; downloaded once into the content-keyed cache for s3://)
and then handed to the library's own `from_pretrained`, so tiny bundles and published
checkpoints take the same path.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from cluster.bundles import resolve_bundle
from cluster.storage import Storage
from schemas.config import ModelRef, StorageConfig

P = TypeVar("P")


def torch_dtype(ref: ModelRef) -> torch.dtype:
    return getattr(torch, ref.dtype)


def load_pipeline(
    ref: ModelRef,
    storage: StorageConfig | None = None,
    pipeline_cls: type[P] | None = None,
    **components: Any,
) -> P:
    """A diffusers pipeline (``pipeline_cls``, default ``DiffusionPipeline``) on
    ``ref.device`` in ``ref.dtype``.

    ``components`` replace or drop parts of the bundle (``text_encoder_3=None``), as in
    diffusers' own ``from_pretrained``.
    """
    if pipeline_cls is None:
        # Imported here: diffusers' package import costs seconds, and the transformers-only
        # actors (captioner, filters) load their models through this module without it.
        from diffusers import DiffusionPipeline

        pipeline_cls = DiffusionPipeline
    path = resolve_bundle(ref.uri, Storage(storage))
    pipe = pipeline_cls.from_pretrained(path, dtype=torch_dtype(ref), **components)
    return pipe.to(ref.device)


def load_model(
    ref: ModelRef, model_cls: type[P], storage: StorageConfig | None = None, **kwargs: Any
) -> P:
    """A transformers or diffusers model class from a bundle folder, in eval mode."""
    path = resolve_bundle(ref.uri, Storage(storage))
    model = model_cls.from_pretrained(path, dtype=torch_dtype(ref), **kwargs)
    return model.to(ref.device).eval()


def load_processor(
    ref: ModelRef, processor_cls: type[P], storage: StorageConfig | None = None, **kwargs: Any
) -> P:
    """The processor (tokenizer, image processor) saved in a transformers bundle folder.

    Processors hold no weights, so ``ref.device`` and ``ref.dtype`` do not apply.
    """
    path = resolve_bundle(ref.uri, Storage(storage))
    return processor_cls.from_pretrained(path, **kwargs)


def load_component_config(
    ref: ModelRef, component_cls: Any, storage: StorageConfig | None = None, subfolder: str = ""
) -> dict[str, Any]:
    """A diffusers component's config (``vae/config.json``) as a dict, without its weights."""
    path = resolve_bundle(ref.uri, Storage(storage))
    return dict(component_cls.load_config(path, subfolder=subfolder or None))
