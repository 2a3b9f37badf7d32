"""One small interface over a local folder or ``s3://bucket/prefix``.

Every method takes a full URI: a local path (``file://`` optional) or ``s3://bucket/key``.
boto3 does the object operations (presigned URLs, managed multipart transfers) and
``filesystem()`` hands out a pyarrow filesystem for bulk reads and writes (Ray Data's
``read_parquet(..., filesystem=fs)``, Ray Train's ``RunConfig(storage_filesystem=fs)``).

Credentials come only from the standard AWS chain, in both boto3 and pyarrow, and are
never passed around: a pickled ``Storage`` or pyarrow filesystem holds the config alone,
and every Ray worker resolves its own credentials from its environment or role.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pyarrow.fs as pafs
from boto3.s3.transfer import TransferConfig, create_transfer_manager

from schemas.config import StorageConfig
from schemas.errors import RaygenError

MIB = 1024 * 1024
S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
# Where botocore looks, in order; named in the error so a user knows what to set.
AWS_CREDENTIAL_CHAIN = (
    "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), AWS_PROFILE and the shared "
    "credentials and config files (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE), web identity "
    "token (AWS_WEB_IDENTITY_TOKEN_FILE), container role, instance metadata (IMDS)"
)
_ACCESS_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}


class StorageError(RaygenError):
    """A storage URI cannot be used; the message names the URI and, for S3, the endpoint."""


@dataclass(frozen=True)
class ObjectInfo:
    """One file in a listing."""

    uri: str
    size: int
    # S3 ETag as the server sends it ('"<md5>"', or '"<hash>-<parts>"' for multipart);
    # None for local files.
    etag: str | None


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: an s3:// URI needs a bucket: s3://bucket/key")
    return bucket, key


def local_path(uri: str) -> Path:
    """The local path a non-S3 URI names (``file://`` stripped, ``~`` expanded)."""
    if is_s3(uri):
        raise StorageError(f"{uri}: not a local path")
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    return Path(uri).expanduser()


def join(uri: str, *parts: str) -> str:
    """Join with '/' for both kinds of URI (``os.path.join`` drops all before an absolute part)."""
    for part in parts:
        uri = f"{uri.rstrip('/')}/{part.strip('/')}"
    return uri


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` that replaces it on success.

    Readers see the old file or the new one, never half of one, and a crash leaves only a
    hidden temp file. A uuid name (not mkstemp) keeps the file's mode the umask's default.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Storage:
    """Read, write, list and transfer files at local paths and ``s3://`` URIs."""

    join = staticmethod(join)

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self.endpoint_url = self.config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._lock = threading.Lock()
        self._client: Any = None
        self._region = self.config.region
        self._filesystems: dict[str, pafs.S3FileSystem] = {}

    def __reduce__(self) -> tuple[type[Storage], tuple[StorageConfig]]:
        # Clients and locks do not pickle; a Ray worker rebuilds them from the config and
        # resolves credentials from its own environment.
        return (Storage, (self.config,))

    @property
    def endpoint_name(self) -> str:
        return self.endpoint_url or "the default AWS S3 endpoint"

    # ---- S3 plumbing ----------------------------------------------------------------

    def _s3(self, uri: str) -> Any:
        """The boto3 client, created on first use; fails fast when no credentials exist."""
        with self._lock:
            if self._client is None:
                session = boto3.Session(region_name=self.config.region)
                if session.get_credentials() is None:
                    raise StorageError(
                        f"{uri}: no AWS credentials found; searched the standard AWS chain: "
                        f"{AWS_CREDENTIAL_CHAIN}"
                    )
                self._region = session.region_name or "us-east-1"
                # Self-hosted endpoints (MinIO, Ceph, moto) rarely have wildcard DNS for
                # virtual-host buckets; path style works on all of them.
                s3_options = {"addressing_style": "path"} if self.endpoint_url else None
                client_config = botocore.config.Config(
                    connect_timeout=self.config.connect_timeout_s,
                    read_timeout=self.config.read_timeout_s,
                    retries={"total_max_attempts": self.config.max_attempts, "mode": "standard"},
                    s3=s3_options,
                )
                self._client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self._region,
                    config=client_config,
                )
            return self._client

    def _transfer_config(self) -> TransferConfig:
        threshold = self.config.multipart_threshold_mb * MIB
        return TransferConfig(multipart_threshold=threshold, multipart_chunksize=threshold)

    @contextlib.contextmanager
    def _s3_errors(self, uri: str) -> Iterator[None]:
        """Turn botocore errors into a StorageError naming the URI and the endpoint."""
        try:
            yield
        except botocore.exceptions.ClientError as err:
            raise self._client_error(uri, err) from err
        except (botocore.exceptions.ConnectionError, botocore.exceptions.ReadTimeoutError) as err:
            raise StorageError(
                f"{uri}: cannot reach S3 endpoint {self.endpoint_name} "
                f"({type(err).__name__} after {self.config.max_attempts} attempts)"
            ) from err

    def _client_error(self, uri: str, err: botocore.exceptions.ClientError) -> StorageError:
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        bucket, _ = split_s3(uri)
        where = f"at {self.endpoint_name}"
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: bucket '{bucket}' does not exist {where}")
        if code == "NoSuchKey":
            return StorageError(f"{uri}: no such object {where}")
        if code in ("404", "NotFound"):  # HEAD responses carry no body to tell which
            return StorageError(f"{uri}: not found {where} (no such key, or no bucket '{bucket}')")
        if code in _ACCESS_DENIED:
            return StorageError(
                f"{uri}: access denied {where} ({code}): check which credentials the AWS "
                "chain found and what they are allowed to do"
            )
        return StorageError(f"{uri}: S3 error {code} {where}: {error.get('Message', '')}")

    # ---- bulk I/O -----------------------------------------------------------------------

    def filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the path inside it, for Ray Data / Ray Train / parquet."""
        if not is_s3(uri):
            return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))
        bucket, key = split_s3(uri)
        self._s3(uri)  # the clear no-credentials error, before pyarrow's opaque one
        with self._lock:
            fs = self._filesystems.get(bucket)
            if fs is None:
                # pyarrow gets no keys: its C++ SDK reads the same AWS chain, so a pickled
                # filesystem (shipped to Ray workers) carries no secrets.
                fs = pafs.S3FileSystem(
                    region=self._region,
                    endpoint_override=self.endpoint_url,
                    connect_timeout=self.config.connect_timeout_s,
                    request_timeout=self.config.read_timeout_s,
                    retry_strategy=pafs.AwsStandardS3RetryStrategy(
                        max_attempts=self.config.max_attempts
                    ),
                )
                self._filesystems[bucket] = fs
        return fs, f"{bucket}/{key}".rstrip("/")

    # ---- objects ------------------------------------------------------------------------

    def read_bytes(self, uri: str) -> bytes:
        if not is_s3(uri):
            try:
                return local_path(uri).read_bytes()
            except FileNotFoundError:
                raise StorageError(f"{uri}: no such file") from None
        bucket, key = split_s3(uri)
        with self._s3_errors(uri):
            return self._s3(uri).get_object(Bucket=bucket, Key=key)["Body"].read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file; readers never see a partial one (S3 PUTs are atomic too)."""
        if not is_s3(uri):
            with _atomic_target(local_path(uri)) as tmp:
                tmp.write_bytes(data)
            return
        bucket, key = split_s3(uri)
        # The type a browser needs to show a presigned URL's PNG or MP4 rather than download it.
        content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        with self._s3_errors(uri):
            self._s3(uri).put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def exists(self, uri: str) -> bool:
        """True for a file, or for a folder / prefix with at least one file under it."""
        if not is_s3(uri):
            return local_path(uri).exists()
        bucket, key = split_s3(uri)
        client = self._s3(uri)
        with self._s3_errors(uri):
            if key:
                try:
                    client.head_object(Bucket=bucket, Key=key)
                    return True
                except botocore.exceptions.ClientError as err:
                    if err.response.get("Error", {}).get("Code") not in ("404", "NotFound"):
                        raise
            # Also raises NoSuchBucket, which HEAD above could not tell from a missing key.
            prefix = f"{key.rstrip('/')}/" if key else ""
            response = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return response.get("KeyCount", 0) > 0

    def list_info(self, uri: str, recursive: bool = True) -> list[ObjectInfo]:
        """Files under the folder / prefix ``uri``, sorted; empty when there are none."""
        if not is_s3(uri):
            root = local_path(uri)
            if not root.is_dir():
                return []
            paths = root.rglob("*") if recursive else root.iterdir()
            infos = [
                ObjectInfo(join(uri, p.relative_to(root).as_posix()), p.stat().st_size, None)
                for p in paths
                if p.is_file()
            ]
            return sorted(infos, key=lambda info: info.uri)
        bucket, key = split_s3(uri)
        prefix = f"{key.rstrip('/')}/" if key else ""
        options = {"Bucket": bucket, "Prefix": prefix} | ({} if recursive else {"Delimiter": "/"})
        infos = []
        with self._s3_errors(uri):
            for page in self._s3(uri).get_paginator("list_objects_v2").paginate(**options):
                for item in page.get("Contents", []):
                    if item["Key"].endswith("/"):  # zero-byte "folder" markers some tools write
                        continue
                    infos.append(
                        ObjectInfo(f"{S3_SCHEME}{bucket}/{item['Key']}", item["Size"], item["ETag"])
                    )
        return sorted(infos, key=lambda info: info.uri)

    def list(self, uri: str, recursive: bool = True) -> list[str]:
        """URIs of the files under the folder / prefix ``uri``, sorted."""
        return [info.uri for info in self.list_info(uri, recursive=recursive)]

    def delete(self, uri: str) -> None:
        """Delete a file or everything under a folder / prefix; a missing one is no error."""
        if not is_s3(uri):
            path = local_path(uri)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            return
        bucket, key = split_s3(uri)
        client = self._s3(uri)
        keys = [info.uri[len(S3_SCHEME) + len(bucket) + 1 :] for info in self.list_info(uri)]
        with self._s3_errors(uri):
            if key:
                client.delete_object(Bucket=bucket, Key=key)
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": k} for k in keys[start : start + 1000]]
                client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})

    # ---- transfers ----------------------------------------------------------------------

    def upload_file(self, local: str | Path, uri: str) -> None:
        """Copy a local file to ``uri``; S3 uploads above the threshold go multipart."""
        if not is_s3(uri):
            with _atomic_target(local_path(uri)) as tmp:
                shutil.copyfile(local, tmp)
            return
        self._upload_many(uri, [(Path(local), uri)])

    def download_file(self, uri: str, local: str | Path) -> None:
        """Copy ``uri`` to a local file; the file appears whole or not at all."""
        if not is_s3(uri):
            try:
                with _atomic_target(Path(local)) as tmp:
                    shutil.copyfile(local_path(uri), tmp)
            except FileNotFoundError:
                raise StorageError(f"{uri}: no such file") from None
            return
        self._download_many(uri, [(uri, Path(local))])

    def upload_dir(self, local_dir: str | Path, uri: str) -> int:
        """Copy every file under ``local_dir`` to ``uri``; returns the number of files."""
        root = Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"{local_dir}: no such folder to upload")
        pairs = [
            (path, join(uri, path.relative_to(root).as_posix()))
            for path in sorted(root.rglob("*"))
            if path.is_file()
        ]
        if not is_s3(uri):
            for source, target in pairs:
                self.upload_file(source, target)
        else:
            self._upload_many(uri, pairs)
        return len(pairs)

    def download_dir(self, uri: str, local_dir: str | Path) -> int:
        """Copy every file under ``uri`` into ``local_dir``; returns the number of files."""
        prefix_len = len(uri.rstrip("/")) + 1
        pairs = [
            (info.uri, Path(local_dir) / info.uri[prefix_len:]) for info in self.list_info(uri)
        ]
        if not is_s3(uri):
            for source, target in pairs:
                self.download_file(source, target)
        else:
            self._download_many(uri, pairs)
        return len(pairs)

    # boto3's transfer manager runs the files concurrently, splits large ones into multipart
    # uploads / ranged GETs, retries, and downloads to a temp name renamed on completion.

    def _upload_many(self, uri: str, pairs: list[tuple[Path, str]]) -> None:
        with (
            self._s3_errors(uri),
            create_transfer_manager(self._s3(uri), self._transfer_config()) as manager,
        ):
            futures = [manager.upload(str(source), *split_s3(target)) for source, target in pairs]
            for future in futures:
                future.result()

    def _download_many(self, uri: str, pairs: list[tuple[str, Path]]) -> None:
        with (
            self._s3_errors(uri),
            create_transfer_manager(self._s3(uri), self._transfer_config()) as manager,
        ):
            futures = []
            for source, target in pairs:
                target.parent.mkdir(parents=True, exist_ok=True)
                futures.append(manager.download(*split_s3(source), str(target)))
            for future in futures:
                future.result()

    def presigned_url(self, uri: str, expires_s: int = 3600) -> str:
        """A URL anyone can GET for ``expires_s`` seconds; ``file://`` for a local path."""
        if not is_s3(uri):
            return local_path(uri).absolute().as_uri()
        bucket, key = split_s3(uri)
        return self._s3(uri).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )

    # ---- preflight ----------------------------------------------------------------------

    def check(self, uri: str) -> None:
        """Fail fast, before a long job starts, when ``uri`` cannot be used.

        S3: credentials exist, the endpoint answers, the bucket exists and lets us in.
        Local: the path exists, or its nearest existing parent is a writable folder.
        """
        if not is_s3(uri):
            path = local_path(uri).absolute()
            if path.exists():
                return
            parent = next(p for p in path.parents if p.exists())
            if not parent.is_dir():
                raise StorageError(f"{uri}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise StorageError(f"{uri}: cannot create it, {parent} is not writable")
            return
        bucket, _ = split_s3(uri)
        client = self._s3(uri)
        with self._s3_errors(uri):
            try:
                client.head_bucket(Bucket=bucket)
            except botocore.exceptions.ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NotFound", "NoSuchBucket"):
                    raise StorageError(
                        f"{uri}: bucket '{bucket}' does not exist at {self.endpoint_name}"
                    ) from err
                raise
