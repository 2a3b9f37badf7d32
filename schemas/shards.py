"""The one row schema of training shards, and the manifest a prep run writes beside them.

Prep writes these rows, training reads them, tests check them. Latents and text embeddings
are Arrow's canonical fixed-shape tensor extension (``arrow.fixed_shape_tensor``), so plain
pyarrow and Ray Data read the shards without raygen installed. Shapes are fixed per bucket:
every shard file holds one aspect-ratio bucket.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SHARD_SCHEMA_VERSION = 1

MediaKind = Literal["image", "video"]


CAPTION_KINDS = ("original", "synthetic")


def shard_schema(
    latent_shape: tuple[int, ...],
    prompt_embeds_shape: tuple[int, ...] | None,
    pooled_embeds_shape: tuple[int, ...] | None,
    *,
    with_latent_std: bool = False,
) -> pa.Schema:
    """Schema of one bucket's shard file.

    latent_shape: (C, h, w) for images, (C, f, h, w) for video.
    prompt_embeds_shape: (L, D) sequence embeddings, or None when shards store tokens only.
    pooled_embeds_shape: (D,) pooled embeddings (SD3's CLIP), or None (Wan has none).

    Both captions are encoded (``*_original`` and ``*_synthetic``, null where a caption is
    missing): which one training uses is a training choice, made without re-encoding.
    """
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("media_kind", pa.string(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        # (top, left, height, width) in original pixels: SDXL-style crop conditioning.
        pa.field("crop_box", pa.list_(pa.int32(), 4), nullable=False),
        pa.field("bucket", pa.string(), nullable=False),
        pa.field("caption_original", pa.string()),
        pa.field("caption_synthetic", pa.string()),
        pa.field("latent_mean", pa.fixed_shape_tensor(pa.float32(), latent_shape), nullable=False),
    ]
    if with_latent_std:
        fields.append(pa.field("latent_std", pa.fixed_shape_tensor(pa.float32(), latent_shape)))
    for kind in CAPTION_KINDS:
        if prompt_embeds_shape is not None:
            embeds = pa.fixed_shape_tensor(pa.float32(), prompt_embeds_shape)
            fields.append(pa.field(f"prompt_embeds_{kind}", embeds))
        if pooled_embeds_shape is not None:
            pooled = pa.fixed_shape_tensor(pa.float32(), pooled_embeds_shape)
            fields.append(pa.field(f"pooled_prompt_embeds_{kind}", pooled))
        # Token ids per text encoder ("clip_l", "clip_g", "t5"): what tokens-only shards keep.
        fields.append(pa.field(f"input_ids_{kind}", pa.map_(pa.string(), pa.list_(pa.int32()))))
    fields += [
        pa.field("clip_score", pa.float32()),
        pa.field("aesthetic_score", pa.float32()),
        pa.field("nsfw_score", pa.float32()),
    ]
    return pa.schema(fields, metadata={b"raygen.shard_schema_version": str(SHARD_SCHEMA_VERSION).encode()})


class Manifest(BaseModel):
    """What a prep run did: written as ``manifest.json`` next to the shards."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SHARD_SCHEMA_VERSION
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    bundle_uri: str
    bundle_digest: str | None = Field(default=None, description="content digest of the bundle")
    config: dict[str, Any] = Field(description="the PrepConfig the run used, as JSON")
    num_inputs: int = 0
    num_written: int = 0
    filtered: dict[str, int] = Field(default_factory=dict, description="filter name -> rows")
    quarantined: dict[str, int] = Field(default_factory=dict, description="reason -> inputs")
    quarantine_uri: str | None = None
    shards: list[str] = Field(default_factory=list, description="shard files, relative")
    buckets: dict[str, int] = Field(default_factory=dict, description="bucket -> rows")
    # Latents are stored unscaled; training applies the VAE's own factors, recorded here per
    # media kind ("image": scaling_factor/shift_factor; "video": Wan's latents_mean/std).
    vae: dict[str, dict[str, Any]] = Field(default_factory=dict)
    empty_prompt: str | None = Field(
        default=None, description="safetensors file of the empty prompt's embeddings (CFG dropout)"
    )
    wall_seconds: float = 0.0
    stage_throughput: dict[str, float] = Field(
        default_factory=dict, description="stage -> rows per second of one actor's busy time"
    )
