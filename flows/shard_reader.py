"""Training's side of the shard contract: prep's buckets in, numpy batches out.

A run reads each aspect-ratio bucket as its own source, so a batch never mixes latent shapes.
How a bucket reaches the workers depends on its size (``LoopConfig.in_memory_bucket_bytes``):

- a small bucket is read once, each worker keeping its own equal share in memory, and
  reshuffled there every epoch: a handful of rows (a DreamBooth or LoRA set) repeats at the
  speed of indexing an array, instead of restarting a Ray Data split every epoch (1-2 s);
- a large one streams through Ray Data (``get_dataset_shard``), never held whole.

``BucketStream`` interleaves them in one seeded bucket sequence that every worker shares; its
(epoch, position) is the data position a checkpoint records, from which a resumed run draws
exactly the batches an uninterrupted one would have. A bucket gives every worker
rows * gradient_accumulation_steps // batch_size batches an epoch whatever the number of
workers, so the position holds on another number of workers too; there the rest of the epoch
is drawn from the new workers' shares (some of its rows again, some only the next epoch).
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cluster.storage import Storage, join
from schemas.config import ConfigError
from schemas.shards import (
    CROP_BOX,
    IMAGE_CONDITION,
    IMAGE_EMBEDS,
    LATENT_MEAN,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    SHARDS_DIR,
    BucketKey,
    Manifest,
)


@dataclass
class Bucket:
    name: str  # str(BucketKey): "48x80" or "9x48x80" ((frames x) height x width), as prep wrote
    files: list[str]
    file_rows: list[int]  # rows in each file
    num_bytes: int  # uncompressed, from the parquet footers
    latent_shape: tuple[int, ...]  # (C, h, w) or (C, f, h, w)
    batches_per_epoch: int = 0  # per worker
    in_memory: bool = False  # read once into the workers' memory; else streamed

    @property
    def num_rows(self) -> int:
        return sum(self.file_rows)


def read_buckets(data: str, manifest: Manifest, media: str, storage: Storage) -> dict[str, Bucket]:
    """The ``media`` buckets a prep output holds, from the parquet footers only."""
    buckets = {}
    for name in sorted(manifest.buckets):
        key = BucketKey.parse(name)
        if key.media_kind != media:
            continue
        files = sorted(
            f for f in storage.list(join(data, SHARDS_DIR, name)) if f.endswith(".parquet")
        )
        if not files:
            raise ConfigError(
                f"data: the manifest lists bucket {name} but {data}/{SHARDS_DIR}/{name} is empty"
            )
        fs, path = storage.filesystem(files[0])
        schema = pq.read_schema(path, filesystem=fs)
        if PROMPT_EMBEDS["original"] not in schema.names:
            raise ConfigError(
                f"data: {data} holds tokens only (prep encode.text: tokens); training reads "
                f"text embeddings: re-run prep with encode.text: embeddings"
            )
        latent_shape = tuple(schema.field(LATENT_MEAN).type.shape)
        height, width = latent_shape[-2:]
        if key.height * width != key.width * height:
            # Shards written before bucket names were height x width name them transposed.
            raise ConfigError(
                f"data: bucket {name} (height x width) holds latents {height}x{width} of the "
                f"other orientation: re-run `raygen prep` into a new output"
            )
        footers = [pq.read_metadata(storage.filesystem(f)[1], filesystem=fs) for f in files]
        buckets[name] = Bucket(
            name,
            files,
            file_rows=[footer.num_rows for footer in footers],
            num_bytes=sum(
                footer.row_group(i).total_byte_size
                for footer in footers
                for i in range(footer.num_row_groups)
            ),
            latent_shape=latent_shape,
        )
    return buckets


# ----------------------------------------------------------------------------------------
# Arrow shards -> numpy batches.
# ----------------------------------------------------------------------------------------


def tensor_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-shape tensor column as (values, present): null rows come back as zeros."""
    column = table.column(name).combine_chunks()
    shape = column.type.shape
    storage = column.storage
    values = storage.values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
    return values.astype(np.float32, copy=False), ~storage.is_null().to_numpy(zero_copy_only=False)


def embeddings_and_latents(table: pa.Table) -> dict[str, np.ndarray]:
    """What training reads of shard rows: ``latents`` (N, C, (f,) h, w), per caption kind
    ``prompt_embeds_{kind}`` (N, L, D), ``pooled_prompt_embeds_{kind}`` (N, D) where the
    family has them, and ``has_{kind}`` (N,) bool; ``size_crop`` (N, 6) int32: the original
    (height, width) and the crop box (top, left, height, width) in original pixels, which
    SDXL conditions on; for image-to-video shards, ``image_embeds`` and ``image_condition``."""
    batch = {"latents": tensor_column(table, LATENT_MEAN)[0]}
    crop = table.column(CROP_BOX).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    batch["size_crop"] = np.concatenate(
        [
            np.stack(
                [table.column(name).to_numpy() for name in (ORIGINAL_HEIGHT, ORIGINAL_WIDTH)],
                axis=1,
            ),
            crop.reshape(len(table), 4),
        ],
        axis=1,
    ).astype(np.int32)
    if IMAGE_EMBEDS in table.column_names:  # image-to-video: the first frame's conditioning
        batch["image_embeds"] = tensor_column(table, IMAGE_EMBEDS)[0]  # (N, T, D)
        batch["image_condition"] = tensor_column(table, IMAGE_CONDITION)[0]  # (N, 4 + C, f, h, w)
    for kind, embeds in PROMPT_EMBEDS.items():
        batch[embeds], batch[f"has_{kind}"] = tensor_column(table, embeds)
        if POOLED_PROMPT_EMBEDS[kind] in table.column_names:
            pooled = POOLED_PROMPT_EMBEDS[kind]
            batch[pooled] = tensor_column(table, pooled)[0]
    return batch


def bucket_datasets(buckets: dict[str, Bucket], storage: Storage) -> dict[str, ray.data.Dataset]:
    """One Ray dataset per streamed bucket; in-memory buckets need none."""
    datasets = {}
    for bucket in buckets.values():
        if bucket.in_memory:
            continue
        fs, _ = storage.filesystem(bucket.files[0])
        paths = [storage.filesystem(f)[1] for f in bucket.files]
        # Tasks, not actors, and a quarter CPU each: the training workers hold most CPUs and
        # an actor pool per bucket would reserve what the reads need.
        ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=0.25)
        datasets[bucket.name] = ds.map_batches(
            embeddings_and_latents, batch_format="pyarrow", num_cpus=0.25
        )
    return datasets


def read_worker_rows(
    bucket: Bucket, storage: Storage, rank: int, num_workers: int
) -> dict[str, np.ndarray]:
    """Worker ``rank``'s share of an in-memory bucket: rows [rank * n, (rank + 1) * n) of the
    files in order, n = num_rows // num_workers, as a streaming split with ``equal=True``
    gives each worker; only the files that hold them are read."""
    share = bucket.num_rows // num_workers
    start, stop = rank * share, (rank + 1) * share
    tables, first = [], 0
    for uri, rows in zip(bucket.files, bucket.file_rows, strict=True):
        if first < stop and first + rows > start:
            fs, path = storage.filesystem(uri)
            table = pq.read_table(path, filesystem=fs)
            begin, end = max(start, first), min(stop, first + rows)
            tables.append(table.slice(begin - first, end - begin))
        first += rows
    return embeddings_and_latents(pa.concat_tables(tables))


# ----------------------------------------------------------------------------------------
# The batch sequence.
# ----------------------------------------------------------------------------------------


@dataclass
class _Held:
    """An in-memory bucket's rows on one worker, and how far this epoch has drawn from them."""

    arrays: dict[str, np.ndarray]  # name -> (n, ...)
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    drawn: int = 0  # batches drawn this epoch


class BucketStream:
    """Batches from several buckets, one bucket per batch.

    Every worker draws the same bucket sequence (shuffled per epoch from the run seed), so the
    workers of one step hold batches of one shape and every bucket's streaming split advances
    on all workers together. The position in that sequence is the data position a checkpoint
    records; resuming skips exactly the batches already consumed in the epoch.

    ``streams``: a Ray Data iterator (``get_dataset_shard``) per streamed bucket; ``held``: this
    worker's rows of each in-memory bucket (``read_worker_rows``). A held bucket is reshuffled
    every epoch from (seed, epoch, rank, bucket), so its batches, like a streamed bucket's,
    are a function of the data position alone.
    """

    def __init__(
        self,
        buckets: dict[str, Bucket],
        streams: dict[str, Any],
        held: dict[str, dict[str, np.ndarray]],
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        rank: int = 0,
    ):
        assert set(streams) | set(held) == set(buckets), "every bucket streamed or held"
        self.streams = streams
        self.held = {name: _Held(arrays) for name, arrays in held.items()}
        self.counts = {name: b.batches_per_epoch for name, b in buckets.items()}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.epoch = 0
        self.position = 0
        self._iters: dict[str, Iterator[dict[str, np.ndarray]]] = {}
        self._start_epoch(0)

    def _schedule(self, epoch: int) -> list[str]:
        order = [name for name, count in self.counts.items() for _ in range(count)]
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0
        self._order = self._schedule(epoch)
        for name, held in self.held.items():
            # crc32, not hash(): the same on every worker process and after a restart.
            rng = np.random.default_rng([self.seed, epoch, self.rank, zlib.crc32(name.encode())])
            held.order = rng.permutation(len(next(iter(held.arrays.values()))))
            held.drawn = 0

    def _iter(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        if name not in self._iters:
            self._iters[name] = iter(
                self.streams[name].iter_batches(
                    batch_size=self.batch_size,
                    batch_format="numpy",
                    drop_last=True,
                    local_shuffle_buffer_size=self.shuffle_buffer or None,
                    local_shuffle_seed=self.seed * 1_000_003 + self.epoch,
                )
            )
        return self._iters[name]

    def _take(self, name: str) -> dict[str, np.ndarray] | None:
        held = self.held.get(name)
        if held is None:
            return next(self._iter(name), None)
        rows = held.order[held.drawn * self.batch_size : (held.drawn + 1) * self.batch_size]
        held.drawn += 1
        if len(rows) < self.batch_size:
            return None
        return {key: values[rows] for key, values in held.arrays.items()}

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position == len(self._order):
            for iterator in self._iters.values():
                for _ in iterator:  # end the epoch of every split before starting another
                    pass
            self._iters.clear()
            self._start_epoch(self.epoch + 1)
        name = self._order[self.position]
        self.position += 1
        batch = self._take(name)
        assert batch is not None, f"bucket {name} ran out before its {self.counts[name]} batches"
        return batch

    def seek(self, epoch: int, position: int) -> None:
        """Continue where a checkpoint left off: same epoch, its consumed batches skipped."""
        self._start_epoch(epoch)
        for name, count in Counter(self._order[:position]).items():
            if name in self.held:
                self.held[name].drawn = count
                continue
            for _ in range(count):
                next(self._iter(name))
        self.position = position
