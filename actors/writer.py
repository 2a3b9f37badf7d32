"""The last prep stage: write each batch's rows as parquet files, atomically, by outcome.

Rows that made it become shard rows (one file per aspect-ratio bucket); quarantined and
filtered rows go to their own tables with the reason. Schemas, column and folder names are
the contract in ``schemas.shards``.
Every file is written whole or not at all and named after the samples in it, so a crash
loses at most the batch in flight and a re-run (which skips written samples) never
duplicates one. The bookkeeping columns (``item_uri``, ``item_sources``, ``source_rows``)
let a re-run decide, from the files alone, which inputs are complete.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.storage import Storage, is_s3, join
from schemas.config import StorageConfig
from schemas.shards import (
    BUCKET,
    CROP_BOX,
    FILTERED_DIR,
    IMAGE_CONDITION,
    IMAGE_EMBEDS,
    INPUT_IDS,
    LATENT_MEAN,
    LATENT_STD,
    MEDIA_KIND,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    QUARANTINE_DIR,
    REJECT_SCHEMA,
    SAMPLE_ID,
    SHARDS_DIR,
    STATUS,
    shard_file_schema,
)


def _tensor_column(values: list[np.ndarray], shape: tuple[int, ...]) -> pa.ExtensionArray:
    """A fixed-shape tensor column; an empty array (a missing caption's embeds) is a null."""
    tensor_type = pa.fixed_shape_tensor(pa.float32(), shape)
    size = int(np.prod(shape))
    missing = np.array([value.size == 0 for value in values])
    flat = np.zeros((len(values), size), dtype=np.float32)  # (N, prod(shape))
    for index, value in enumerate(values):
        if value.size:
            assert value.shape == shape, f"{value.shape} in a {shape} bucket"
            flat[index] = value.reshape(-1)
    storage = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1)), size, mask=pa.array(missing)
    )
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def _shape_of(values: list[np.ndarray]) -> tuple[int, ...] | None:
    shapes = {value.shape for value in values if value.size}
    assert len(shapes) <= 1, f"mixed shapes in one bucket: {shapes}"
    return shapes.pop() if shapes else None


def _part_name(sample_ids: list[str]) -> str:
    # Named after its samples: the same batch written twice lands on the same name.
    digest = hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


class ShardWriter:
    """Ray Data stage: ``__call__(batch)`` writes the batch's files, returns one stats row."""

    def __init__(self, output: str, latent_std: bool, storage: StorageConfig) -> None:
        self.output = output  # PrepConfig.output
        self.latent_std = latent_std  # EncodeConfig.latent_std: the std column is in the schema
        self.storage = Storage(storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status = batch[STATUS]
        files: list[str] = []
        ok = np.flatnonzero(status == "ok")
        for bucket in sorted(set(batch[BUCKET][ok])):
            rows = ok[batch[BUCKET][ok] == bucket]
            files.append(self._write_shard(batch, rows, str(bucket)))
        for outcome, folder in (("quarantined", QUARANTINE_DIR), ("filtered", FILTERED_DIR)):
            rows = np.flatnonzero(status == outcome)
            if rows.size:
                files.append(self._write_rejects(batch, rows, folder))
        seconds = {
            name: float(np.sum(batch[name])) for name in batch if name.startswith("seconds_")
        }
        counts = Counter(str(s) for s in status)
        return {
            "rows": np.array([len(status)]),
            "written": np.array([counts["ok"]]),
            "quarantined": np.array([counts["quarantined"]]),
            "filtered": np.array([counts["filtered"]]),
            "files": np.array([len(files)]),
            **{name: np.array([value]) for name, value in seconds.items()},
        }

    def _write_shard(self, batch: dict[str, np.ndarray], rows: np.ndarray, bucket: str) -> str:
        take = {name: [batch[name][i] for i in rows] for name in batch}
        if take[MEDIA_KIND][0] == "image":
            # In flight an image is a one-frame clip (C, 1, h, w); shards keep (C, h, w).
            for name in (LATENT_MEAN, LATENT_STD):
                if name in take:
                    take[name] = [np.squeeze(latent, axis=1) for latent in take[name]]
        latent_shape = _shape_of(take[LATENT_MEAN])
        assert latent_shape is not None, "ok rows always carry latents"
        embeds_shape = pooled_shape = None
        if PROMPT_EMBEDS["original"] in take:
            embeds_shape = _shape_of([v for name in PROMPT_EMBEDS.values() for v in take[name]])
        if POOLED_PROMPT_EMBEDS["original"] in take:
            pooled = [v for name in POOLED_PROMPT_EMBEDS.values() for v in take[name]]
            pooled_shape = _shape_of(pooled)
        image_shapes = None
        if IMAGE_EMBEDS in take and _shape_of(take[IMAGE_EMBEDS]) is not None:
            image_shapes = (_shape_of(take[IMAGE_EMBEDS]), _shape_of(take[IMAGE_CONDITION]))
        schema = shard_file_schema(
            latent_shape,
            embeds_shape,
            pooled_shape,
            with_latent_std=self.latent_std,
            image_shapes=image_shapes,
        )
        columns: dict[str, Any] = {}
        for field in schema:
            name = field.name
            if isinstance(field.type, pa.FixedShapeTensorType):
                columns[name] = _tensor_column(take[name], tuple(field.type.shape))
            elif name in INPUT_IDS.values():
                columns[name] = [_token_map(value) for value in take.get(name, [None] * len(rows))]
            elif name == CROP_BOX:
                columns[name] = [list(map(int, box)) for box in take[name]]
            elif name in take:
                columns[name] = [_plain(value) for value in take[name]]
            else:
                columns[name] = [None] * len(rows)
        table = pa.Table.from_pydict(columns, schema=schema)
        return self._write(table, join(SHARDS_DIR, bucket), take[SAMPLE_ID])

    def _write_rejects(self, batch: dict[str, np.ndarray], rows: np.ndarray, folder: str) -> str:
        columns = {
            field.name: [
                _plain(batch[field.name][i]) if field.name in batch else None for i in rows
            ]
            for field in REJECT_SCHEMA
        }
        table = pa.Table.from_pydict(columns, schema=REJECT_SCHEMA)
        return self._write(table, folder, columns[SAMPLE_ID])

    def _write(self, table: pa.Table, folder: str, sample_ids: list[str]) -> str:
        uri = join(self.output, folder, _part_name([str(s) for s in sample_ids]))
        fs, path = self.storage.filesystem(uri)
        if is_s3(uri):
            # An S3 object appears only when its (multipart) upload completes: atomic.
            pq.write_table(table, path, filesystem=fs)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{os.path.dirname(path)}/.{uuid.uuid4().hex}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        return uri


def _plain(value: Any) -> Any:
    """numpy scalars to Python, NaN scores to null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _token_map(value: Any) -> list[tuple[str, list[int]]] | None:
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return None
    # Ray joins per-row dicts into one struct type: keys a row lacks come back as None.
    return [
        (str(key), [int(t) for t in ids]) for key, ids in dict(value).items() if ids is not None
    ]
