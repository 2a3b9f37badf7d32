from __future__ import annotations

import os
import pickle
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.storage import MIB, Storage, StorageError, join, split_s3
from schemas.config import StorageConfig


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder URI to work under: a local path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return join(request.getfixturevalue("s3_bucket"), "root")


@pytest.fixture
def storage(storage_config: StorageConfig) -> Storage:
    return Storage(storage_config)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_no_secret(message: str) -> None:
    assert os.environ.get("AWS_SECRET_ACCESS_KEY", "raygen-test-secret-key") not in message
    assert "raygen-test-secret-key" not in message


def test_join() -> None:
    assert join("s3://bucket", "a/", "/b.txt") == "s3://bucket/a/b.txt"
    assert join("s3://bucket/p/", "x") == "s3://bucket/p/x"
    assert join("/data/root", "a", "b") == "/data/root/a/b"


def test_round_trip_bytes(storage: Storage, root: str) -> None:
    uri = join(root, "a", "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    assert storage.exists(join(root, "a"))  # a folder / prefix with files in it
    assert not storage.exists(join(root, "nope"))
    storage.write_bytes(uri, b"again")
    assert storage.read_bytes(uri) == b"again"


def test_list_and_delete(storage: Storage, root: str) -> None:
    for name in ("top.txt", "a/one.txt", "a/deep/two.txt", "ab.txt"):
        storage.write_bytes(join(root, name), name.encode())
    assert storage.list(root) == [
        join(root, "a/deep/two.txt"),
        join(root, "a/one.txt"),
        join(root, "ab.txt"),
        join(root, "top.txt"),
    ]
    assert storage.list(root, recursive=False) == [join(root, "ab.txt"), join(root, "top.txt")]
    sizes = [info.size for info in storage.list_info(join(root, "a"))]
    assert sizes == [len("a/deep/two.txt"), len("a/one.txt")]
    assert storage.list(join(root, "missing")) == []

    storage.delete(join(root, "a"))  # a prefix: everything under it, not the sibling "ab.txt"
    assert storage.list(root) == [join(root, "ab.txt"), join(root, "top.txt")]
    storage.delete(join(root, "top.txt"))
    storage.delete(join(root, "top.txt"))  # already gone: no error
    assert storage.list(root) == [join(root, "ab.txt")]


def test_local_write_is_atomic(tmp_path: Path) -> None:
    storage = Storage(StorageConfig())
    path = tmp_path / "f.bin"
    storage.write_bytes(str(path), b"old")
    with path.open("rb") as reader:
        inode = path.stat().st_ino
        storage.write_bytes(f"file://{path}", b"new")
        # Replaced by rename, not rewritten in place: an open reader still sees the old file.
        assert reader.read() == b"old"
    assert path.stat().st_ino != inode
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temp file left behind


def test_missing_object_names_uri(storage: Storage, root: str) -> None:
    uri = join(root, "no", "such.bin")
    with pytest.raises(StorageError, match=uri) as info:
        storage.read_bytes(uri)
    assert_no_secret(str(info.value))
    with pytest.raises(StorageError, match=uri):
        storage.download_file(uri, Path("/tmp/never-written"))


def test_missing_bucket_names_uri(storage: Storage) -> None:
    uri = "s3://raygen-no-such-bucket/key"
    for call in (storage.read_bytes, storage.check, storage.exists, storage.list):
        with pytest.raises(StorageError, match="bucket 'raygen-no-such-bucket' does not exist"):
            call(uri)


def test_upload_goes_multipart_above_threshold(
    storage_config: StorageConfig, s3_bucket: str, s3_client: Any, tmp_path: Path
) -> None:
    # moto, like S3, refuses parts under 5 MiB except the last one.
    storage = Storage(storage_config.model_copy(update={"multipart_threshold_mb": 5}))
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(os.urandom(6 * MIB))
    small.write_bytes(os.urandom(1024))
    storage.upload_file(big, join(s3_bucket, "big.bin"))
    storage.upload_file(small, join(s3_bucket, "small.bin"))

    bucket, _ = split_s3(s3_bucket)
    assert s3_client.head_object(Bucket=bucket, Key="big.bin")["ETag"].endswith('-2"')
    assert "-" not in s3_client.head_object(Bucket=bucket, Key="small.bin")["ETag"]
    storage.download_file(join(s3_bucket, "big.bin"), tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == big.read_bytes()


def test_upload_and_download_dir(storage: Storage, root: str, tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name in ("x.txt", "sub/y.txt", "sub/deeper/z.txt"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    assert storage.upload_dir(source, join(root, "tree")) == 3
    assert storage.download_dir(join(root, "tree"), tmp_path / "copy") == 3
    for name in ("x.txt", "sub/y.txt", "sub/deeper/z.txt"):
        assert (tmp_path / "copy" / name).read_text() == name


def test_presigned_url_downloads_with_plain_http(storage: Storage, root: str) -> None:
    uri = join(root, "image.png")
    storage.write_bytes(uri, b"\x89PNG data")
    url = storage.presigned_url(uri, expires_s=60)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"\x89PNG data"


def test_parquet_through_pyarrow_filesystem(storage: Storage, root: str) -> None:
    table = pa.table({"sample_id": ["a", "b"], "score": [0.5, 0.25]})
    fs, path = storage.filesystem(join(root, "shards", "part-0.parquet"))
    # LocalFileSystem does not create parents on write; on S3 this writes a zero-byte
    # "folder/" marker, which Storage listings skip.
    fs.create_dir(path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert storage.list(join(root, "shards")) == [join(root, "shards", "part-0.parquet")]
    # Ray Data / Ray Train ship the filesystem to workers by pickling it.
    fs_again = pickle.loads(pickle.dumps(fs))
    assert pq.read_table(path, filesystem=fs_again).equals(table)


def test_storage_pickles_for_ray_workers(storage: Storage, s3_bucket: str) -> None:
    uri = join(s3_bucket, "k")
    storage.write_bytes(uri, b"v")
    copy = pickle.loads(pickle.dumps(storage))
    assert copy.config == storage.config
    assert copy.read_bytes(uri) == b"v"


def test_check(storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    storage.check(join(s3_bucket, "anything"))
    storage.check(str(tmp_path / "new" / "folder"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.check(str(tmp_path / "file" / "below"))


def test_no_credentials_fails_fast(
    storage_config: StorageConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Leave the whole AWS chain empty: no env keys, empty files, no metadata service.
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("BOTO_CONFIG", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    storage = Storage(storage_config)
    for call in (storage.check, storage.read_bytes, storage.filesystem):
        start = time.monotonic()
        with pytest.raises(StorageError, match="no AWS credentials found") as info:
            call("s3://some-bucket/key")
        assert time.monotonic() - start < 10
        assert "AWS_ACCESS_KEY_ID" in str(info.value)  # says which chain it searched


def test_unreachable_endpoint_fails_fast(storage_config: StorageConfig) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"  # nothing listens there
    storage = Storage(storage_config.model_copy(update={"endpoint_url": endpoint}))
    for call in (storage.check, storage.read_bytes, storage.list):
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}") as info:
            call("s3://some-bucket/key")
        assert time.monotonic() - start < 10
        assert_no_secret(str(info.value))
