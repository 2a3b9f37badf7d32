import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.shards import BucketKey, Manifest, shard_schema


def _rows(num_rows: int, latent_shape, embeds_shape, pooled_shape) -> pa.Table:
    schema = shard_schema(latent_shape, embeds_shape, pooled_shape)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((num_rows, *latent_shape), dtype=np.float32)
    embeds = rng.standard_normal((num_rows, *embeds_shape), dtype=np.float32)
    pooled = rng.standard_normal((num_rows, *pooled_shape), dtype=np.float32)
    columns = {
        "sample_id": [f"s{i}" for i in range(num_rows)],
        "source_uri": [f"file:///corpus/{i}.png" for i in range(num_rows)],
        "media_kind": ["image"] * num_rows,
        "original_height": [96] * num_rows,
        "original_width": [64] * num_rows,
        "crop_box": [[0, 0, 96, 64]] * num_rows,
        "bucket": [str(BucketKey(height=96, width=64))] * num_rows,
        "caption_original": ["a cat"] * num_rows,
        "caption_synthetic": [None] * num_rows,
        "latent_mean": pa.FixedShapeTensorArray.from_numpy_ndarray(latents),
        "prompt_embeds_original": pa.FixedShapeTensorArray.from_numpy_ndarray(embeds),
        "pooled_prompt_embeds_original": pa.FixedShapeTensorArray.from_numpy_ndarray(pooled),
        "input_ids_original": [[("t5", [1, 2, 3])]] * num_rows,
        "prompt_embeds_synthetic": [None] * num_rows,
        "pooled_prompt_embeds_synthetic": [None] * num_rows,
        "input_ids_synthetic": [None] * num_rows,
        "clip_score": [0.3] * num_rows,
        "aesthetic_score": [None] * num_rows,
        "nsfw_score": [None] * num_rows,
    }
    return pa.Table.from_pydict(columns, schema=schema), latents


def test_shard_round_trips_through_plain_parquet(tmp_path):
    table, latents = _rows(3, (16, 12, 8), (10, 32), (64,))
    pq.write_table(table, tmp_path / "shard.parquet")
    back = pq.read_table(tmp_path / "shard.parquet")
    assert back.schema.equals(table.schema)
    # Tensor columns come back as tensors, with their shape, in plain pyarrow.
    assert back.schema.field("latent_mean").type.shape == [16, 12, 8]
    np.testing.assert_array_equal(back.column("latent_mean").combine_chunks().to_numpy_ndarray(), latents)
    assert back.schema.metadata[b"raygen.shard_schema_version"] == b"1"


def test_optional_columns_follow_the_arguments():
    tokens_only = shard_schema((16, 1, 8, 8), None, None, with_latent_std=True)
    assert "prompt_embeds_original" not in tokens_only.names
    assert "input_ids_synthetic" in tokens_only.names
    assert "latent_std" in tokens_only.names
    assert tokens_only.field("latent_mean").type.shape == [16, 1, 8, 8]


def test_manifest_json_round_trip():
    manifest = Manifest(
        bundle_uri="s3://models/sd3",
        config={"batch_size": 8},
        num_inputs=10,
        num_written=7,
        quarantined={"truncated": 2},
        filtered={"clip_score": 1},
        vae={"image": {"scaling_factor": 1.5305, "shift_factor": 0.0609}},
    )
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_bucket_key_has_one_format_and_one_parser():
    wide, clip = BucketKey(height=48, width=80), BucketKey(height=48, width=80, num_frames=9)
    # Height before width, like the pixel and latent axes (F, H, W) / (C, f, h, w).
    assert (str(wide), str(clip)) == ("48x80", "9x48x80")
    assert (wide.media_kind, clip.media_kind) == ("image", "video")
    for key in (wide, clip, BucketKey(64, 64)):
        assert BucketKey.parse(str(key)) == key
    for name in ("", "48", "48x", "48x80x9x9", "ax80", "0x80", "-4x80", "48X80"):
        with pytest.raises(ValueError, match=f"bucket {name!r}: expected HEIGHTxWIDTH"):
            BucketKey.parse(name)
