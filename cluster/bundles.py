"""Model bundles: diffusers' folder layout (or a transformers model folder), local or s3://.

A bundle on S3 is downloaded once per content into ``StorageConfig.cache_dir``. The cache
key comes from the listing (relative key, size, ETag), so deciding "already have it" costs
one LIST and no download. Workers on one node take a file lock, so one of them downloads
while the others wait; the download goes to a temp folder renamed into place, so a crash
never leaves half a bundle under a valid key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.storage import ObjectInfo, Storage, is_s3, join, local_path
from schemas.errors import RaygenError

WEIGHT_SUFFIX = ".safetensors"
# Beside a bundle raygen distilled: how to sample it ({"num_inference_steps", "guidance_scale"}).
# Guidance is folded into a student, so a pipeline must not apply it again.
SAMPLING_FILE = "raygen_sampling.json"
# A LoRA folder: diffusers' weights file (``save_lora_weights``), and beside a LoRA raygen
# trained, its base bundle and settings.
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_FILE = "raygen_adapter.json"
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class BundleError(RaygenError):
    """A bundle folder is not usable; the message names the path and the missing part."""


def resolve_bundle(uri: str, storage: Storage) -> Path:
    """A local, validated bundle folder for ``uri`` (downloaded and cached for s3://)."""
    return resolve_folder(uri, storage, validate_bundle, kind="bundle")


def resolve_folder(uri: str, storage: Storage, validate: Callable[..., Any], kind: str) -> Path:
    """A local folder for ``uri``, checked by ``validate(path, source=uri)``: the folder
    itself, or for s3:// a copy in ``<cache_dir>/<kind>s`` downloaded once per content."""
    if not is_s3(uri):
        path = local_path(uri)
        validate(path, source=uri)
        return path
    listing = storage.list_info(uri)
    if not listing:
        raise BundleError(f"{kind} {uri}: no files under it")
    cache_root = Path(storage.config.cache_dir).expanduser() / f"{kind}s"
    target = cache_root / _cache_name(uri, listing)
    if target.is_dir():  # only validated, complete folders are ever renamed into place
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Workers on one node that start together wait for one download instead of each
    # fetching the same gigabytes; the OS drops the lock if its holder dies.
    with (cache_root / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_dir():
            _download_into(uri, storage, target, validate, kind)
    return target


def _download_into(
    uri: str, storage: Storage, target: Path, validate: Callable[..., Any], kind: str
) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        storage.download_dir(uri, staging)
        # A key must name exactly the bytes under it: refuse content that moved mid-download.
        if _cache_name(uri, storage.list_info(uri)) != target.name:
            raise BundleError(f"{kind} {uri}: changed while it was downloading; try again")
        validate(staging, source=uri)
        # Atomic: a reader sees no folder or the whole bundle.
        try:
            os.rename(staging, target)
        except OSError:
            # flock does not hold across hosts sharing the cache (NFS): another host may
            # have renamed the same content into place first; its copy is identical.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cache_name(uri: str, listing: list[ObjectInfo]) -> str:
    prefix_len = len(uri.rstrip("/")) + 1
    digest = hashlib.sha256()
    for info in sorted(listing, key=lambda i: i.uri):
        digest.update(f"{info.uri[prefix_len:]}\0{info.size}\0{info.etag}\n".encode())
    # The folder's own name first, so a person can tell cached bundles apart.
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])
    return f"{name}-{digest.hexdigest()[:16]}"


def validate_adapter(path: str | Path, *, source: str | None = None) -> None:
    """A local LoRA folder holds its weights file."""
    if not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise BundleError(f"adapter {source or path}: no {ADAPTER_WEIGHTS} in it")


def validate_bundle(path: str | Path, *, source: str | None = None) -> dict[str, Any]:
    """Check a local bundle folder; returns model_index.json, or config.json for transformers.

    ``source`` is what messages call the bundle (the s3:// URI of a downloaded one).
    """
    root = Path(path)
    shown = (source or str(path)).rstrip("/")
    if not root.is_dir():
        raise BundleError(f"bundle {shown}: no such folder")
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json", f"{shown}/model_index.json")
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2:
                continue  # "_class_name", "_diffusers_version", pipeline options
            library, class_name = spec
            if class_name is None:  # [null, null]: an optional component left out
                continue
            _check_component(root, shown, name, library, class_name)
        return index
    if (root / "config.json").is_file():
        config = _read_json(root / "config.json", f"{shown}/config.json")
        _check_weights(root, f"bundle {shown}: transformers model", shown)
        return config
    raise BundleError(
        f"bundle {shown}: not a model folder: no {shown}/model_index.json (diffusers pipeline) "
        f"and no {shown}/config.json (transformers model)"
    )


def read_bundle_json(uri: str | Path, name: str, storage: Storage | None = None) -> dict[str, Any]:
    """One JSON file of a bundle (``model_index.json``, ``vae/config.json``), local or s3://,
    read on its own: a bundle's facts without fetching (or validating) its weights."""
    shown = join(str(uri), name)
    return _parse_json((storage or Storage()).read_bytes(shown), shown)


def _read_json(path: Path, shown: str) -> dict[str, Any]:
    return _parse_json(path.read_bytes(), shown)


def _parse_json(text: bytes, shown: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{shown}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{shown}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_files(class_name: str) -> tuple[tuple[str, ...], bool]:
    """The files (any one will do) a component folder must hold, and whether it has weights."""
    if "Tokenizer" in class_name:
        return ("tokenizer_config.json", "tokenizer.json"), False
    if "Scheduler" in class_name:
        return ("scheduler_config.json",), False
    if "Processor" in class_name or "FeatureExtractor" in class_name:
        return ("preprocessor_config.json", "processor_config.json"), False
    return ("config.json",), True


def _check_component(root: Path, shown: str, name: str, library: str, class_name: str) -> None:
    label = f"bundle {shown}: component '{name}' ({library} {class_name})"
    folder = root / name
    if not folder.is_dir():
        raise BundleError(f"{label} missing: no folder {shown}/{name}/")
    config_files, has_weights = _config_files(class_name)
    if not any((folder / f).is_file() for f in config_files):
        raise BundleError(f"{label} missing: no {shown}/{name}/{config_files[0]}")
    if has_weights:
        _check_weights(folder, label, f"{shown}/{name}")


def _check_weights(folder: Path, label: str, shown: str) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(n.endswith(WEIGHT_SUFFIX) for n in names):
        return
    unsafe = [n for n in names if n.endswith(UNSAFE_WEIGHT_SUFFIXES)]
    if unsafe:
        # Pickle-based weights can run code when loaded; raygen loads safetensors only.
        raise BundleError(
            f"{label}: weights are {unsafe[0]} (pickle) in {shown}/, not safetensors; "
            "re-save with save_pretrained(..., safe_serialization=True)"
        )
    raise BundleError(f"{label}: no weights: no *{WEIGHT_SUFFIX} file in {shown}/")


def bundle_digest(path: str | Path) -> str:
    """sha256 over every file's relative path and content: the same bundle anywhere, same hex."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {path}: no such folder")
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0".encode())
        digest.update(_file_sha256(file))
    return digest.hexdigest()


def _file_sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):  # weights can be GBs: never read whole
            digest.update(chunk)
    return digest.digest()
