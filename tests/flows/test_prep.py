"""`raygen prep` end to end on a real local Ray: a small real corpus with broken files, local
and s3:// (loopback S3 server), resume after a kill, and shards readable without raygen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from actors.decode import MediaDecoder
from actors.sources import FetchMedia, list_inputs
from cluster.storage import Storage
from flows.prep import is_small_corpus, preflight, run_prep
from flows.samples import build_broken_files, write_webdataset_tar
from schemas.config import ConfigError, PrepConfig, load_config
from schemas.errors import RaygenError
from schemas.shards import MANIFEST_NAME, BucketKey, Manifest
from tests.conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundles(tiny_bundles):
    """The session's tiny bundles: t2i, t2v, the captioner and the scorer."""
    return tiny_bundles


@pytest.fixture(scope="module")
def corpus(sample_run, tmp_path_factory):
    """The sample corpus the session prepped (tests/sample_prep.py), and what each of its broken files must be quarantined for
    (``build_broken_files`` names and writes them the same way every time: written again
    elsewhere, for the names only)."""
    return sample_run.data / "corpus", build_broken_files(tmp_path_factory.mktemp("broken"))


def _config(bundles, input_uri: str, output_uri: str, **overrides) -> PrepConfig:
    values = {
        "input": input_uri,
        "output": output_uri,
        "bundle.uri": str(bundles["t2i"]),
        "video_bundle.uri": str(bundles["t2v"]),
        "caption.model.uri": str(bundles["captioner"]),
        "filters.scorer.uri": str(bundles["scorer"]),
        **overrides,
    }
    return load_config(PrepConfig, values=values)


def _rows(root: str, fs: pafs.FileSystem | None = None) -> dict[str, dict]:
    """sample_id -> row, tensors as numpy; read file by file (each bucket has its own latent
    shape, so the folder is not one table). Fails on a duplicated sample."""
    fs = fs or pafs.LocalFileSystem()
    rows: dict[str, dict] = {}
    for info in fs.get_file_info(pafs.FileSelector(str(root), recursive=True)):
        if not info.base_name.endswith(".parquet") or info.base_name.startswith("."):
            continue
        table = pq.read_table(info.path, filesystem=fs)
        for index in range(table.num_rows):
            row = {}
            for name in table.column_names:
                value = table.column(name)[index]
                if isinstance(value.type, pa.FixedShapeTensorType):
                    row[name] = value.to_numpy() if value.is_valid else None
                else:
                    row[name] = value.as_py()
            assert row["sample_id"] not in rows, f"duplicate {row['sample_id']}"
            rows[row["sample_id"]] = row
    return rows


@pytest.fixture(scope="module")
def local_run(bundles, corpus, sample_run, ray_local):
    """The session's sample prep (tests/sample_prep.py ran `run_prep` with this config on its
    own local Ray): its config, manifest and output folder."""
    root, _ = corpus
    output = sample_run.data / "shards"
    manifest = Manifest.model_validate_json((output / MANIFEST_NAME).read_text())
    return _config(bundles, str(root), str(output)), manifest, output


def test_every_valid_input_written_and_every_broken_one_quarantined(local_run, corpus):
    config, manifest, output = local_run
    _, broken = corpus
    rows = _rows(output / "shards")  # fails on a duplicate
    assert len(rows) == manifest.num_written > 0
    quarantine = pq.read_table(output / "quarantine").to_pydict()
    reasons = {Path(uri).name: reason for uri, reason in zip(quarantine["source_uri"], quarantine["reason"], strict=True)}
    for name, reason in broken.items():
        assert reasons.get(name) == reason, name
    assert sum(manifest.quarantined.values()) == len(quarantine["sample_id"])
    # Images and video clips both made it, each bucket with one latent shape.
    assert {row["media_kind"] for row in rows.values()} == {"image", "video"}
    for row in rows.values():
        # Images (C, h, w), clips (C, f, h, w); the bucket names the pixels they came from.
        key = BucketKey.parse(row["bucket"])
        assert key.media_kind == row["media_kind"]
        assert row["latent_mean"].ndim == (3 if row["media_kind"] == "image" else 4)
        # (C, (f,) h, w): the VAE's 8x downscale of the bucket's height and width.
        assert row["latent_mean"].shape[-2:] == (key.height // 8, key.width // 8)
    manifest_file = json.loads((output / "manifest.json").read_text())
    assert manifest_file["num_written"] == manifest.num_written
    assert manifest_file["vae"]["image"]["scaling_factor"] == pytest.approx(1.5305)
    assert (output / "empty_prompt.safetensors").is_file()
    assert set(manifest.stage_throughput) >= {"decode", "caption", "encode_latents"}


def test_preflight_reads_the_frame_rule_and_bucket_step_from_the_bundles(bundles, tmp_path):
    config = _config(bundles, str(tmp_path / "in"), str(tmp_path / "out"))
    assert config.buckets.step is None
    assert preflight(config, Storage()).buckets.step == 16  # VAE downscale 8 x patch 2
    bad = _config(bundles, str(tmp_path / "in"), str(tmp_path / "out"), **{"buckets.step": 24})
    with pytest.raises(ConfigError, match="^buckets.step: 24 is not a multiple of 16"):
        preflight(bad, Storage())
    # Wan's VAE downscales time 4x: clips of 4k+1 frames.
    bad = _config(
        bundles, str(tmp_path / "in"), str(tmp_path / "out"), **{"decode.video_num_frames": 8}
    )
    with pytest.raises(RaygenError, match=r"^decode.video_num_frames: 8 frames.*4k\+1 frames"):
        preflight(bad, Storage())
    # Without a video bundle any count will do: nothing encodes clips.
    images_only = bad.model_copy(update={"video_bundle": None})
    assert preflight(images_only, Storage()).decode.video_num_frames == 8
    # The image bundle must be an image family's.
    swapped = _config(
        bundles, str(tmp_path / "in"), str(tmp_path / "out"), **{"bundle.uri": str(bundles["t2v"])}
    )
    with pytest.raises(RaygenError, match="WanPipeline makes videos, but this needs one that"):
        preflight(swapped, Storage())


def test_a_few_large_tars_are_not_a_small_corpus(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    write_webdataset_tar(tmp_path / "small.tar", {"0": {"jpg": b"x" * 1000}})
    config = PrepConfig(input=str(tmp_path), small_corpus_inputs=4)
    items = list_inputs(config, Storage())
    assert is_small_corpus(items, config, Storage())  # 2 files + a tar under 1 MiB
    # A tar of 3 MiB of samples counts as at least 3 inputs: over 4 with only 4 files.
    write_webdataset_tar(tmp_path / "large.tar", {"0": {"jpg": b"x" * 3 * 2**20}})
    items = list_inputs(config, Storage())
    assert len(items) == 4 and not is_small_corpus(items, config, Storage())
    never = config.model_copy(update={"small_corpus_inputs": 0})
    assert not is_small_corpus(items[:1], never, Storage())


def test_shards_readable_by_plain_pyarrow_and_ray_data(local_run):
    _, manifest, output = local_run
    for shard in manifest.shards:
        table = pq.read_table(output / shard)
        latent_type = table.schema.field("latent_mean").type
        latents = table.column("latent_mean").combine_chunks().to_numpy_ndarray()
        assert latents.shape[1:] == tuple(latent_type.shape)
        assert np.isfinite(latents).all()
    rows = ray.data.read_parquet(str(output / "shards")).count()
    assert rows == manifest.num_written


def test_stored_latents_and_embeddings_match_diffusers(local_run, bundles):
    config, _, output = local_run
    row = next(r for r in _rows(output / "shards").values() if r["media_kind"] == "image")
    source = row["source_uri"]

    # The same preprocessing the flow ran, then the bundle VAE's own encode.
    items = [item for item in list_inputs(config, Storage(config.storage)) if source.startswith(item["item_uri"])]
    fetched = FetchMedia(config.decode, config.storage)({k: np.array([item[k] for item in items], dtype=object) for k in items[0]})
    decoded = MediaDecoder(config.decode, preflight(config, Storage()).buckets)(fetched)
    index = list(decoded["source_uri"]).index(source)
    pixels = torch.from_numpy(np.asarray(decoded["pixels"][index], dtype=np.float32))
    pixels = (pixels / 127.5 - 1.0).permute(0, 3, 1, 2)  # (1, H, W, 3) -> (1, 3, H, W)
    vae = AutoencoderKL.from_pretrained(bundles["t2i"] / "vae")
    with torch.inference_mode():
        expected = vae.encode(pixels).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(row["latent_mean"], expected, atol=1e-4)

    pipe = StableDiffusion3Pipeline.from_pretrained(bundles["t2i"], transformer=None, vae=None)
    caption = row["caption_original"]
    with torch.inference_mode():
        embeds, _, pooled, _ = pipe.encode_prompt(
            caption, caption, caption, do_classifier_free_guidance=False,
            max_sequence_length=config.encode.max_sequence_length,
        )
    np.testing.assert_allclose(row["prompt_embeds_original"], embeds[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(row["pooled_prompt_embeds_original"], pooled[0].numpy(), atol=1e-4)


def _written(output: Path) -> dict[str, tuple[int, bytes]]:
    """Every data file under ``output``: its mtime (ns) and bytes, so a rewrite of a file
    under the same name shows. Hidden names are writes in flight (or killed), not data."""
    return {
        str(path.relative_to(output)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in output.rglob("*.parquet")
        if not path.name.startswith((".", "_"))
    }


def test_rerun_on_complete_output_writes_nothing(local_run):
    config, manifest, output = local_run
    before = _written(output)
    again = run_prep(config)
    assert _written(output) == before
    assert again.num_written == manifest.num_written
    assert again.quarantined == manifest.quarantined


def test_s3_in_and_out_match_local(local_run, bundles, corpus, s3_bucket, storage_config):
    _, manifest, output = local_run
    root, _ = corpus
    storage = Storage(storage_config)
    storage.upload_dir(root, f"{s3_bucket}/corpus")
    # One actor pool per model stage, as a large corpus runs; the local run held all models
    # in one actor (a small corpus): both must write the same rows.
    config = _config(bundles, f"{s3_bucket}/corpus", f"{s3_bucket}/shards",
                     storage=storage_config.model_dump(), small_corpus_inputs=0)
    remote = run_prep(config)
    assert {"Filters", "Captioner", "TextEncoder", "LatentEncoder"} <= set(_actor_classes())
    assert remote.num_written == manifest.num_written
    assert remote.quarantined == manifest.quarantined
    fs, path = storage.filesystem(f"{s3_bucket}/shards/shards")
    remote_rows, local_rows = _rows(path, fs), _rows(output / "shards")

    # Sample ids derive from the source URI, which differs; the path under the input doesn't.
    def by_source(rows: dict[str, dict], prefix: str) -> dict[tuple[str, str], dict]:
        return {
            (row["source_uri"].removeprefix(prefix), sid.partition("-")[2]): row
            for sid, row in rows.items()
        }

    remote, local = by_source(remote_rows, f"{s3_bucket}/corpus/"), by_source(local_rows, f"{root}/")
    assert remote.keys() == local.keys()
    for key, row in remote.items():
        for name in ("latent_mean", "prompt_embeds_original", "prompt_embeds_synthetic"):
            if row[name] is None:  # no caption to encode
                assert local[key][name] is None
            else:
                np.testing.assert_allclose(row[name], local[key][name], atol=1e-4)


def _actor_classes() -> list[str]:
    """The Ray Data stages this Ray has started actors for (alive or done), read from the GCS
    (actors that ended are there too)."""
    from ray._private.state import actors

    # Ray Data names an actor "MapWorker(MapBatches(<stage>))".
    names = [actor["ActorClassName"] for actor in actors().values()]
    return [name.rpartition("(")[2].split(")")[0] for name in names]


def _cli(config_path: Path) -> subprocess.Popen:
    """`raygen prep` as a driver of the session's Ray (through $RAY_ADDRESS, as a Ray Job's
    command is): no cluster of its own to start."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "prep", "--config", str(config_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=env,
    )


def test_killed_run_resumes_to_the_uninterrupted_result(bundles, corpus, tmp_path, local_run):
    _, clean, clean_output = local_run
    root, _ = corpus
    output = tmp_path / "resumed"
    config = _config(bundles, str(root), str(output), rows_per_file=1,
                     **{"decode.resources.batch_size": 1, "caption.resources.batch_size": 1,
                        "encode.resources.batch_size": 1, "filters.resources.batch_size": 1})
    config_path = tmp_path / "prep.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    # Kill the driver as soon as its first shard lands (Ray then ends the job's actors and
    # tasks): a quarantine file alone would not show that written shards survive the resume.
    process = _cli(config_path)
    deadline = time.monotonic() + 180
    while not list((output / "shards").rglob("part-*.parquet")):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no shard file appeared"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (output / "manifest.json").exists(), "the run finished before the kill"
    before = _written(output)

    # The resume, in this process on the session's Ray (run_prep, what the CLI calls), at
    # the default batch sizes: neither changes which rows it must still write.
    run_prep(_config(bundles, str(root), str(output), rows_per_file=1))
    # A small corpus: the model stages shared one actor.
    assert "ModelStages" in _actor_classes()
    # What the killed run wrote stays as it was: the resume wrote only what was missing.
    after = _written(output)
    assert {name: after.get(name) for name in before} == before
    assert len(after) > len(before)

    resumed, reference = _rows(output / "shards"), _rows(clean_output / "shards")
    assert resumed.keys() == reference.keys()
    for sample_id, row in resumed.items():
        np.testing.assert_allclose(row["latent_mean"], reference[sample_id]["latent_mean"], atol=1e-4)
        assert row["caption_synthetic"] == reference[sample_id]["caption_synthetic"]
    quarantined = pq.read_table(output / "quarantine").column("sample_id").to_pylist()
    assert len(quarantined) == len(set(quarantined)) == sum(clean.quarantined.values())
