"""The shard reader on the demo's prep shards: in-memory and streamed buckets give the same
kind of batches, and a stream resumed from a data position continues exactly."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.storage import Storage
from flows.shard_reader import BucketStream, bucket_datasets, read_buckets, read_worker_rows
from schemas.shards import MANIFEST_NAME, BucketKey, Manifest

pytestmark = pytest.mark.slow

BATCH_SIZE = 2


def _buckets(shards, in_memory: bool):
    manifest = Manifest.model_validate_json((shards / MANIFEST_NAME).read_text())
    buckets = read_buckets(str(shards), manifest, "image", Storage())
    for bucket in buckets.values():
        bucket.batches_per_epoch = bucket.num_rows // BATCH_SIZE
        bucket.in_memory = in_memory
    return {name: bucket for name, bucket in buckets.items() if bucket.batches_per_epoch}


def _stream(buckets) -> BucketStream:
    storage = Storage()
    held = {
        name: read_worker_rows(bucket, storage, rank=0, num_workers=1)
        for name, bucket in buckets.items()
        if bucket.in_memory
    }
    streams = {
        name: dataset.streaming_split(1, equal=True)[0]
        for name, dataset in bucket_datasets(buckets, storage).items()
    }
    return BucketStream(buckets, streams, held, BATCH_SIZE, seed=3, shuffle_buffer=4)


def test_buckets_keep_prep_names_and_latent_orientation(prep_shards):
    buckets = _buckets(prep_shards, in_memory=True)
    assert any(BucketKey.parse(name).width > BucketKey.parse(name).height for name in buckets)
    for name, bucket in buckets.items():
        key = BucketKey.parse(name)
        # (C, h, w): the VAE's 8x downscale of the bucket's height x width.
        assert bucket.latent_shape[1:] == (key.height // 8, key.width // 8)
        assert bucket.num_bytes > 0 and bucket.num_rows == sum(bucket.file_rows)


def test_a_worker_holds_its_equal_share_of_a_small_bucket(prep_shards):
    bucket = max(_buckets(prep_shards, in_memory=True).values(), key=lambda b: b.num_rows)
    shares = [read_worker_rows(bucket, Storage(), rank, num_workers=2) for rank in range(2)]
    share = bucket.num_rows // 2
    assert [len(rows["latents"]) for rows in shares] == [share, share]
    whole = read_worker_rows(bucket, Storage(), rank=0, num_workers=1)["latents"]
    both = np.concatenate([rows["latents"] for rows in shares])
    np.testing.assert_array_equal(both, whole[: 2 * share])
    assert shares[0]["latents"].shape[1:] == bucket.latent_shape


@pytest.mark.parametrize("streamed", [0, 1], ids=["in-memory", "one-streamed"])
def test_a_resumed_stream_draws_the_batches_an_uninterrupted_one_would(
    ray_local, prep_shards, streamed
):
    # The two smallest buckets, all held or the smallest one streamed (as a run holds small
    # buckets and streams large ones): a streamed bucket restarts its split every epoch
    # (seconds), so one is enough.
    smallest = sorted(_buckets(prep_shards, True).values(), key=lambda b: b.num_rows)[:2]
    for bucket in smallest[:streamed]:
        bucket.in_memory = False
    buckets = {bucket.name: bucket for bucket in smallest}
    per_epoch = sum(bucket.batches_per_epoch for bucket in buckets.values())
    stream = _stream(buckets)
    positions, batches = [], []
    for _ in range(2 * per_epoch + 1):  # across two epoch boundaries
        positions.append((stream.epoch, stream.position))
        batches.append(next(stream))
    assert stream.epoch == 2
    # A held bucket is reshuffled every epoch: epoch 1 is not epoch 0 again.
    assert not all(
        np.array_equal(a["latents"], b["latents"])
        for a, b in zip(batches[:per_epoch], batches[per_epoch : 2 * per_epoch], strict=True)
    )

    cut = per_epoch + per_epoch // 2 + 1  # mid second epoch
    resumed = _stream(buckets)
    resumed.seek(*positions[cut])
    for expected in batches[cut:]:
        got = next(resumed)
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
