from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from cluster.bundles import BundleError, bundle_digest, resolve_bundle, validate_bundle
from cluster.storage import Storage, join
from schemas.config import StorageConfig

MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.35.0",
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "image_encoder": [None, None],  # optional component left out
}


def make_bundle(root: Path, seed: int = 0) -> Path:
    """A small folder in diffusers' layout: model_index.json plus three components."""
    (root / "vae").mkdir(parents=True)
    (root / "scheduler").mkdir()
    (root / "tokenizer").mkdir()
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX))
    (root / "vae" / "config.json").write_text(json.dumps({"latent_channels": 4}))
    weights = {"w": np.random.default_rng(seed).standard_normal((8, 8)).astype(np.float32)}
    save_file(weights, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"max_length": 77}))
    return root


@pytest.fixture
def storage(storage_config: StorageConfig) -> Storage:
    return Storage(storage_config)


def cached_bundles(storage: Storage) -> list[str]:
    """Folders in the bundle cache, temp folders included."""
    root = Path(storage.config.cache_dir) / "bundles"
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_validate_returns_model_index(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "t2i")
    assert validate_bundle(bundle) == MODEL_INDEX


def test_validate_transformers_folder(tmp_path: Path) -> None:
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "enc" / "model.safetensors"))
    assert validate_bundle(tmp_path / "enc") == {"model_type": "t5"}


def test_resolve_local_returns_the_folder(storage: Storage, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "t2i")
    assert resolve_bundle(str(bundle), storage) == bundle
    assert resolve_bundle(f"file://{bundle}", storage) == bundle


def test_resolve_s3_downloads_once_per_content(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    uri = join(s3_bucket, "bundles", "t2i")
    storage.upload_dir(make_bundle(tmp_path / "t2i"), uri)

    first = resolve_bundle(uri, storage)
    assert first.parent == Path(storage.config.cache_dir) / "bundles"
    assert validate_bundle(first) == MODEL_INDEX
    assert bundle_digest(first) == bundle_digest(tmp_path / "t2i")
    weights = first / "vae" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    # A file only this test writes: a second download would replace the folder and lose it.
    (first / "sentinel").write_text("still here")

    second = resolve_bundle(uri, storage)
    assert second == first
    assert (second / "sentinel").read_text() == "still here"
    assert weights.stat().st_mtime_ns == mtime

    # New content (same names, same sizes: the ETag tells them apart) -> new key.
    other = make_bundle(tmp_path / "t2i-retrained", seed=1)
    storage.upload_file(
        other / "vae" / "diffusion_pytorch_model.safetensors", join(uri, "vae", weights.name)
    )
    third = resolve_bundle(uri, storage)
    assert third != first
    assert bundle_digest(third) == bundle_digest(other)
    assert cached_bundles(storage) == sorted([first.name, third.name])  # no temp folders left


def test_concurrent_resolves_share_one_download(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    uri = join(s3_bucket, "t2i")
    storage.upload_dir(make_bundle(tmp_path / "t2i"), uri)
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: resolve_bundle(uri, storage), range(4)))
    assert len(paths) == 1
    assert validate_bundle(paths.pop()) == MODEL_INDEX
    assert len(cached_bundles(storage)) == 1


def break_component_config(root: Path) -> None:
    (root / "vae" / "config.json").unlink()


def break_component_folder(root: Path) -> None:
    shutil.rmtree(root / "vae")


def break_weights_to_bin(root: Path) -> None:
    weights = root / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))


def break_no_weights(root: Path) -> None:
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()


def break_tokenizer(root: Path) -> None:
    (root / "tokenizer" / "tokenizer_config.json").unlink()


def break_model_index_json(root: Path) -> None:
    (root / "model_index.json").write_text("{not json")


def break_no_index(root: Path) -> None:
    (root / "model_index.json").unlink()


# (how to break the bundle, what the error must say); {b} is the bundle path.
BAD_BUNDLES = [
    (
        break_component_config,
        "bundle {b}: component 'vae' (diffusers AutoencoderKL) missing: no {b}/vae/config.json",
    ),
    (
        break_component_folder,
        "bundle {b}: component 'vae' (diffusers AutoencoderKL) missing: no folder {b}/vae/",
    ),
    (
        break_weights_to_bin,
        "bundle {b}: component 'vae' (diffusers AutoencoderKL): weights are "
        "diffusion_pytorch_model.bin (pickle) in {b}/vae/, not safetensors",
    ),
    (
        break_no_weights,
        "bundle {b}: component 'vae' (diffusers AutoencoderKL): no weights: "
        "no *.safetensors file in {b}/vae/",
    ),
    (
        break_tokenizer,
        "bundle {b}: component 'tokenizer' (transformers CLIPTokenizer) missing: "
        "no {b}/tokenizer/tokenizer_config.json",
    ),
    (break_model_index_json, "{b}/model_index.json: not valid JSON"),
    (break_no_index, "bundle {b}: not a model folder: no {b}/model_index.json"),
]


@pytest.mark.parametrize(
    ("breaker", "message"), BAD_BUNDLES, ids=[breaker.__name__ for breaker, _ in BAD_BUNDLES]
)
def test_bad_bundle_names_path_and_component(
    breaker: Callable[[Path], None], message: str, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "t2i")
    breaker(bundle)
    with pytest.raises(BundleError) as info:
        validate_bundle(bundle)
    assert message.format(b=bundle) in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"bundle {tmp_path}/nope: no such folder"):
        validate_bundle(tmp_path / "nope")


def test_bad_s3_bundle_is_named_by_uri_and_never_cached(
    storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path / "t2i")
    break_weights_to_bin(bundle)
    uri = join(s3_bucket, "t2i")
    storage.upload_dir(bundle, uri)
    with pytest.raises(BundleError, match=f"bundle {uri}: component 'vae'.*not safetensors"):
        resolve_bundle(uri, storage)
    assert cached_bundles(storage) == []
    with pytest.raises(BundleError, match=f"bundle {s3_bucket}/empty: no files under it"):
        resolve_bundle(join(s3_bucket, "empty"), storage)


def test_bundle_digest_follows_content(tmp_path: Path) -> None:
    a = make_bundle(tmp_path / "a")
    b = make_bundle(tmp_path / "b")
    assert bundle_digest(a) == bundle_digest(b)  # same content, different place
    (b / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 1.0}))
    assert bundle_digest(a) != bundle_digest(b)
