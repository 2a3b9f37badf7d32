"""The shard contract, whole: what a prep run writes and training reads.

- The layout of a prep output: ``shards/<bucket>/part-*.parquet``, ``quarantine/`` and
  ``filtered/`` tables, ``manifest.json`` and the empty prompt's embeddings beside them.
- Column names, the one row schema of training shards, and the ledger and reject tables.
- ``BucketKey``: a bucket's name, written and parsed here only.

Prep writes these rows, training reads them, tests check them. Latents and text embeddings
are Arrow's canonical fixed-shape tensor extension (``arrow.fixed_shape_tensor``), so plain
pyarrow and Ray Data read the shards without raygen installed. Shapes are fixed per bucket:
every shard file holds one aspect-ratio bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SHARD_SCHEMA_VERSION = 1

MediaKind = Literal["image", "video"]

# ---- the layout of a prep output ---------------------------------------------------------
SHARDS_DIR = "shards"  # shards/<bucket>/part-*.parquet
QUARANTINE_DIR = "quarantine"  # inputs that could not be used, with the reason
FILTERED_DIR = "filtered"  # rows a filter dropped, with the score
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"  # "" embeddings, for CFG dropout

# ---- column names --------------------------------------------------------------------------
SAMPLE_ID = "sample_id"
SOURCE_URI = "source_uri"
MEDIA_KIND = "media_kind"
ORIGINAL_HEIGHT = "original_height"
ORIGINAL_WIDTH = "original_width"
CROP_BOX = "crop_box"
BUCKET = "bucket"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
# Image-to-video (a video bundle that conditions on an image): what its transformer reads of
# the clip's first frame, as the pipeline prepares an input image.
IMAGE_EMBEDS = "image_embeds"  # (N, D) the image encoder's tokens
IMAGE_CONDITION = "image_condition"  # (4 + C, f, h, w) first-frame mask and latents
CLIP_SCORE = "clip_score"
AESTHETIC_SCORE = "aesthetic_score"
NSFW_SCORE = "nsfw_score"
SCORE_COLUMNS = (CLIP_SCORE, AESTHETIC_SCORE, NSFW_SCORE)
# Prep's bookkeeping: which input a row came from and how many rows that input gives.
ITEM_URI = "item_uri"
ITEM_SOURCES = "item_sources"
SOURCE_ROWS = "source_rows"
# Why a row is not a shard row.
STATUS = "status"
REASON = "reason"
DETAIL = "detail"

# Both captions are kept and encoded; the columns of each, by caption kind.
CAPTION_KINDS = ("original", "synthetic")
CAPTION = {kind: f"caption_{kind}" for kind in CAPTION_KINDS}
PROMPT_EMBEDS = {kind: f"prompt_embeds_{kind}" for kind in CAPTION_KINDS}
POOLED_PROMPT_EMBEDS = {kind: f"pooled_prompt_embeds_{kind}" for kind in CAPTION_KINDS}
INPUT_IDS = {kind: f"input_ids_{kind}" for kind in CAPTION_KINDS}


@dataclass(frozen=True)
class BucketKey:
    """An aspect-ratio bucket: the ``bucket`` column's value and its folder under ``shards/``.

    Written ``{height}x{width}`` for an image and ``{num_frames}x{height}x{width}`` for a
    video clip: the order of the pixel and latent axes ((F,) H, W and (C, (f,) h, w)), so a
    name reads like the shape of what is in it.
    """

    height: int
    width: int
    num_frames: int | None = None  # None: an image

    @property
    def media_kind(self) -> MediaKind:
        return "image" if self.num_frames is None else "video"

    def __str__(self) -> str:
        sizes = (self.height, self.width)
        if self.num_frames is not None:
            sizes = (self.num_frames, *sizes)
        return "x".join(map(str, sizes))

    @classmethod
    def parse(cls, name: str) -> BucketKey:
        parts = name.split("x")
        if len(parts) not in (2, 3) or not all(part.isdigit() and int(part) > 0 for part in parts):
            raise ValueError(
                f"bucket {name!r}: expected HEIGHTxWIDTH (an image) or FRAMESxHEIGHTxWIDTH (a clip)"
            )
        sizes = [int(part) for part in parts]
        return cls(*sizes) if len(sizes) == 2 else cls(sizes[1], sizes[2], num_frames=sizes[0])


def shard_schema(
    latent_shape: tuple[int, ...],
    prompt_embeds_shape: tuple[int, ...] | None,
    pooled_embeds_shape: tuple[int, ...] | None,
    *,
    with_latent_std: bool = False,
    image_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> pa.Schema:
    """Schema of one bucket's shard file.

    latent_shape: (C, h, w) for images, (C, f, h, w) for video.
    prompt_embeds_shape: (L, D) sequence embeddings, or None when shards store tokens only.
    pooled_embeds_shape: (D,) pooled embeddings (SD3's CLIP), or None (Wan has none).
    image_shapes: ((N, D), (4 + C, f, h, w)) of an image-to-video bundle's first-frame
    columns, or None.

    Both captions are encoded (``*_original`` and ``*_synthetic``, null where a caption is
    missing): which one training uses is a training choice, made without re-encoding.
    """
    fields = [
        pa.field(SAMPLE_ID, pa.string(), nullable=False),
        pa.field(SOURCE_URI, pa.string(), nullable=False),
        pa.field(MEDIA_KIND, pa.string(), nullable=False),
        pa.field(ORIGINAL_HEIGHT, pa.int32(), nullable=False),
        pa.field(ORIGINAL_WIDTH, pa.int32(), nullable=False),
        # (top, left, height, width) in original pixels: SDXL-style crop conditioning.
        pa.field(CROP_BOX, pa.list_(pa.int32(), 4), nullable=False),
        pa.field(BUCKET, pa.string(), nullable=False),
        *(pa.field(CAPTION[kind], pa.string()) for kind in CAPTION_KINDS),
        pa.field(LATENT_MEAN, pa.fixed_shape_tensor(pa.float32(), latent_shape), nullable=False),
    ]
    if with_latent_std:
        fields.append(pa.field(LATENT_STD, pa.fixed_shape_tensor(pa.float32(), latent_shape)))
    if image_shapes is not None:
        for name, shape in zip((IMAGE_EMBEDS, IMAGE_CONDITION), image_shapes, strict=True):
            fields.append(pa.field(name, pa.fixed_shape_tensor(pa.float32(), shape)))
    for kind in CAPTION_KINDS:
        if prompt_embeds_shape is not None:
            embeds = pa.fixed_shape_tensor(pa.float32(), prompt_embeds_shape)
            fields.append(pa.field(PROMPT_EMBEDS[kind], embeds))
        if pooled_embeds_shape is not None:
            pooled = pa.fixed_shape_tensor(pa.float32(), pooled_embeds_shape)
            fields.append(pa.field(POOLED_PROMPT_EMBEDS[kind], pooled))
        # Token ids per text encoder ("clip_l", "clip_g", "t5"): what tokens-only shards keep.
        fields.append(pa.field(INPUT_IDS[kind], pa.map_(pa.string(), pa.list_(pa.int32()))))
    fields += [
        *(pa.field(name, pa.float32()) for name in SCORE_COLUMNS),
    ]
    return pa.schema(
        fields, metadata={b"raygen.shard_schema_version": str(SHARD_SCHEMA_VERSION).encode()}
    )


# Columns every table prep writes carries (shards, quarantine, filtered): the files are the
# ledger a re-run reads to tell which samples and which whole inputs are already done.
LEDGER_FIELDS = [
    pa.field(SAMPLE_ID, pa.string(), nullable=False),
    pa.field(SOURCE_URI, pa.string(), nullable=False),
    pa.field(ITEM_URI, pa.string(), nullable=False),
    pa.field(ITEM_SOURCES, pa.int32(), nullable=False),
    pa.field(SOURCE_ROWS, pa.int32(), nullable=False),
]
LEDGER_COLUMNS = [field.name for field in LEDGER_FIELDS]

# The quarantine and filtered tables: a row that is not a shard row, and why.
REJECT_SCHEMA = pa.schema(
    LEDGER_FIELDS
    + [
        pa.field(MEDIA_KIND, pa.string()),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string()),
        pa.field(CAPTION["original"], pa.string()),
        *(pa.field(name, pa.float32()) for name in SCORE_COLUMNS),
    ]
)


def shard_file_schema(
    latent_shape: tuple[int, ...],
    prompt_embeds_shape: tuple[int, ...] | None,
    pooled_embeds_shape: tuple[int, ...] | None,
    *,
    with_latent_std: bool = False,
    image_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> pa.Schema:
    """What a file under ``shards/`` holds: the shard schema plus the ledger columns it lacks."""
    schema = shard_schema(
        latent_shape,
        prompt_embeds_shape,
        pooled_embeds_shape,
        with_latent_std=with_latent_std,
        image_shapes=image_shapes,
    )
    for field in LEDGER_FIELDS:
        if field.name not in schema.names:
            schema = schema.append(field)
    return schema


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
    # media kind, as the bundle's family reads them from its VAE config (actors/families.py:
    # SD3's scaling_factor/shift_factor, Wan's latents_mean/std).
    vae: dict[str, dict[str, Any]] = Field(default_factory=dict)
    empty_prompt: str | None = Field(
        default=None, description="safetensors file of the empty prompt's embeddings (CFG dropout)"
    )
    wall_seconds: float = 0.0
    stage_throughput: dict[str, float] = Field(
        default_factory=dict, description="stage -> rows per second of one actor's busy time"
    )
