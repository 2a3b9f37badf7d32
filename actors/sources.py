"""The first prep stage: list a corpus into work items, then fetch each item's bytes.

``list_inputs`` runs on the driver and turns ``PrepConfig.input`` (a folder, an ``s3://``
prefix, or a ``.parquet`` / ``.jsonl`` listing) into small work items: a file with its
caption, or a WebDataset tar. ``FetchMedia`` runs on Ray Data and turns items into media
rows carrying their bytes, one row per sample of a tar. An item that cannot be read becomes
a row with a quarantine reason, so one bad file never stops the job.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import EpsImagePlugin, Image, ImageFile, features

from actors.batches import object_column, optional_text
from cluster.storage import Storage, is_s3, join, local_path
from schemas.config import DecodeConfig, PrepConfig, StorageConfig
from schemas.errors import RaygenError

VIDEO_EXTENSIONS = frozenset({"mp4", "webm", "mov"})
# PIL formats whose decoder is a separate library that a Pillow build may lack: the
# features.check name of that library.
PIL_CODECS = {"AVIF": "avif", "WEBP": "webp", "JPEG2000": "jpg_2000"}
# Formats PIL registers but cannot decode by itself: it reads only MPEG's header (and .mpg is
# a video name), and EPS needs a Ghostscript binary.
PIL_HEADER_ONLY = frozenset({"MPEG"} | (set() if EpsImagePlugin.has_ghostscript() else {"EPS"}))


def _pil_image_formats() -> tuple[dict[str, str], dict[str, str]]:
    """Extension -> PIL format, for the formats this Pillow decodes and for those it registers
    but cannot decode here (a missing codec library, a stub that needs a handler)."""
    Image.init()  # registers every plugin's extensions
    readable: dict[str, str] = {}
    missing: dict[str, str] = {}
    for extension, pil_format in Image.registered_extensions().items():
        name = extension.lstrip(".").lower()
        if pil_format not in Image.OPEN or name in VIDEO_EXTENSIONS:
            continue  # write-only (PDF, PALM) or a video name
        factory = Image.OPEN[pil_format][0]
        is_stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        codec = PIL_CODECS.get(pil_format)
        lacks_codec = codec is not None and not features.check(codec)
        usable = not (is_stub or pil_format in PIL_HEADER_ONLY or lacks_codec)
        (readable if usable else missing)[name] = pil_format
    return readable, missing


# Every image format the installed Pillow reads (JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF, ...)
# is an image input, by extension; a multi-frame file gives its first frame.
IMAGE_EXTENSIONS, UNREADABLE_IMAGE_EXTENSIONS = _pil_image_formats()
IMAGE_FORMATS = tuple(sorted(set(IMAGE_EXTENSIONS.values())))  # what MediaDecoder opens
# A .txt holds the caption of the media file with the same stem; a .json its metadata.
SIDECAR_EXTENSIONS = frozenset({"txt", "json"})
LISTING_SUFFIXES = (".parquet", ".jsonl")

# Every reason a row can be quarantined for; this stage gives the first three (and
# "corrupt" for a tar), MediaDecoder the rest.
QUARANTINE_REASONS = (
    "unsupported_format",  # not an image PIL reads (IMAGE_EXTENSIONS) nor an mp4/webm/mov video
    "unreadable",  # storage could not read it (missing, denied) or its caption is not UTF-8
    "too_large",  # above decode.max_bytes; never read
    "empty_file",  # zero bytes
    "corrupt",  # not a decodable image/video (or not a tar)
    "truncated",  # the image's data ends early
    "decompression_bomb",  # above decode.max_pixels
    "too_small",  # shorter side below decode.min_side
    "too_short",  # a video without one clip of decode.video_num_frames frames
)

# Columns of FetchMedia's output (MediaDecoder's input); all object arrays of str / bytes /
# None but the two counts (int32).
MEDIA_COLUMNS = (
    "sample_id",  # first 16 hex of sha256(source_uri): the same on every run
    "source_uri",  # the file, or "<tar uri>#<member name>"
    "item_uri",  # the work item it came from (the file or the tar)
    "item_sources",  # int32: how many source_uri rows that item expanded into
    "media_kind",  # "image" | "video" | "unknown"
    "caption_original",  # str or None
    "data",  # bytes; b"" when the row is quarantined
    "reason",  # "" or one of QUARANTINE_REASONS
    "detail",  # "" or why, for a person
)
# Between 8 MiB reads; tarfile itself asks for 10 KiB at a time (an S3 GET each, unbuffered).
TAR_BUFFER_BYTES = 8 * 1024 * 1024


class Quarantine(Exception):
    """A row's input is unusable: carries the reason (one of QUARANTINE_REASONS) and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _split_name(name: str) -> tuple[str, str]:
    """``"dir/a.b.JPG"`` -> ``("dir/a.b", "jpg")``; the extension is "" when there is none."""
    stem, dot, extension = name.rpartition(".")
    if not dot or "/" in extension:
        return name, ""
    return stem, extension.lower()


def _unsupported(name: str) -> Quarantine:
    extension = _split_name(name)[1]
    detail = f"extension {extension!r}"
    if extension in UNREADABLE_IMAGE_EXTENSIONS:
        pil_format = UNREADABLE_IMAGE_EXTENSIONS[extension]
        detail += f": this Pillow cannot decode {pil_format} (its codec or handler is not installed)"
    return Quarantine("unsupported_format", detail)


def media_kind(name: str) -> str:
    """The kind of media a name holds, by its extension: "image", "video" or "unknown"."""
    extension = _split_name(name)[1]
    if extension in IMAGE_EXTENSIONS:
        return "image"
    return "video" if extension in VIDEO_EXTENSIONS else "unknown"


def sample_id(source_uri: str) -> str:
    return hashlib.sha256(source_uri.encode()).hexdigest()[:16]


def pair_sidecars(names: list[str]) -> list[tuple[str, str | None]]:
    """Each file that is not a sidecar, with its ``<stem>.txt`` caption (or None), sorted.

    Sidecars without a file to belong to are returned as files of their own, so that they
    are quarantined (``unsupported_format``) and counted instead of vanishing.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_split_name(name)[0], []).append(name)
    pairs: list[tuple[str, str | None]] = []
    for group in groups.values():
        owners = [name for name in group if _split_name(name)[1] not in SIDECAR_EXTENSIONS]
        caption = next((name for name in group if _split_name(name)[1] == "txt"), None)
        pairs += [(name, caption) for name in owners] if owners else [(n, None) for n in group]
    return sorted(pairs)


def _item(uri: str, caption_uri: str | None = None, caption: str | None = None) -> dict[str, Any]:
    kind = "tar" if _split_name(uri)[1] == "tar" else "file"
    return {"item_uri": uri, "kind": kind, "caption_uri": caption_uri, "caption": caption}


def _resolve(uri: str, base: str) -> str:
    """A listing's ``uri`` value, made absolute against the listing's folder ``base``."""
    if is_s3(uri):
        return uri
    if is_s3(base):
        return join(base, uri)
    return os.path.abspath(os.path.join(base, local_path(uri)))


def _read_listing(uri: str, storage: Storage) -> pa.Table:
    fs, path = storage.filesystem(uri)
    try:
        if uri.endswith(".parquet"):
            return pq.read_table(path, filesystem=fs)
        with fs.open_input_stream(path) as stream:
            return pajson.read_json(stream)
    except (OSError, pa.ArrowInvalid) as err:
        raise RaygenError(f"{uri}: cannot read the listing: {err}") from None


def _listing_items(uri: str, storage: Storage) -> list[dict[str, Any]]:
    table = _read_listing(uri, storage)
    if "uri" not in table.column_names:
        raise RaygenError(f"{uri}: a listing needs a `uri` column; it has {table.column_names}")
    uris = table.column("uri").to_pylist()
    has_captions = "caption" in table.column_names
    captions = table.column("caption").to_pylist() if has_captions else [None] * len(uris)
    base = uri.rpartition("/")[0]
    items: dict[str, dict[str, Any]] = {}
    for row, (value, caption) in enumerate(zip(uris, captions, strict=True)):
        if not isinstance(value, str) or not value:
            raise RaygenError(f"{uri}: row {row}: `uri` must be a non-empty string, got {value!r}")
        if caption is not None and not isinstance(caption, str):
            raise RaygenError(f"{uri}: row {row}: `caption` must be a string, got {caption!r}")
        resolved = _resolve(value, base)
        if resolved in items:
            raise RaygenError(f"{uri}: row {row}: {value!r} is listed twice")
        items[resolved] = _item(resolved, caption=caption)
    return [items[key] for key in sorted(items)]


def list_inputs(config: PrepConfig, storage: Storage) -> list[dict[str, Any]]:
    """The work items of ``config.input``, sorted by ``item_uri``.

    An item is ``{"item_uri", "kind": "file" | "tar", "caption_uri": str | None,
    "caption": str | None}``: a caption comes from a listing's ``caption`` column, or is
    read from the ``caption_uri`` sidecar by FetchMedia.
    """
    source = config.input
    if not is_s3(source):
        # Absolute: Ray workers do not share the driver's working directory.
        source = os.path.abspath(local_path(source))
    if source.endswith(LISTING_SUFFIXES):
        items = _listing_items(source, storage)
    else:
        items = [
            _item(uri, caption_uri) for uri, caption_uri in pair_sidecars(storage.list(source))
        ]
    if not items:
        raise RaygenError(
            f"input {config.input}: no files found; expected a folder or s3:// prefix of media, "
            f"or a {' / '.join(LISTING_SUFFIXES)} listing with a `uri` column"
        )
    return items


def _clean(caption: str | None) -> str | None:
    """A caption stripped; an empty one is no caption."""
    return (caption or "").strip() or None


def _decode_caption(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Quarantine("unreadable", f"caption {where} is not UTF-8: {err}") from None


class FetchMedia:
    """Ray Data stage: a batch of work items -> a batch of media rows (``MEDIA_COLUMNS``).

    A file gives one row, a WebDataset tar one row per media member (with its ``<key>.txt``
    caption). A tar that cannot be read to its end gives one quarantined row for the tar.
    """

    def __init__(self, config: DecodeConfig, storage: StorageConfig) -> None:
        self.storage = Storage(storage)
        self.max_bytes = config.max_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        for item_uri, kind, caption_uri, caption in zip(
            batch["item_uri"], batch["kind"], batch["caption_uri"], batch["caption"], strict=True
        ):
            if kind == "tar":
                item_rows = self._fetch_tar(item_uri)
            else:
                item_rows = [
                    self._fetch_file(item_uri, optional_text(caption_uri), optional_text(caption))
                ]
            for row in item_rows:
                row["item_uri"], row["item_sources"] = item_uri, len(item_rows)
            rows += item_rows
        columns = {name: object_column([row[name] for row in rows]) for name in MEDIA_COLUMNS}
        columns["item_sources"] = np.array([row["item_sources"] for row in rows], dtype=np.int32)
        return columns

    def _read(self, uri: str) -> bytes:
        fs, path = self.storage.filesystem(uri)
        try:
            with fs.open_input_file(path) as file:
                size = file.size()
                if size > self.max_bytes:
                    raise Quarantine(
                        "too_large", f"{size} bytes > decode.max_bytes {self.max_bytes}"
                    )
                return file.read()
        except OSError as err:
            raise Quarantine("unreadable", str(err)) from None

    def _fetch_file(self, uri: str, caption_uri: str | None, caption: str | None) -> dict[str, Any]:
        kind = media_kind(uri)
        try:
            if kind == "unknown":
                raise _unsupported(uri)
            data = self._read(uri)
            if caption_uri is not None:
                caption = _decode_caption(self._read(caption_uri), caption_uri)
            return _media_row(uri, kind, caption, data)
        except Quarantine as quarantine:
            return _media_row(uri, kind, caption, b"", quarantine)

    def _fetch_tar(self, uri: str) -> list[dict[str, Any]]:
        # Streamed ("r|"): one pass, no seeks, so an S3 object is read with sequential GETs.
        sizes: dict[str, int] = {}
        contents: dict[str, bytes] = {}
        fs, path = self.storage.filesystem(uri)
        try:
            with (
                fs.open_input_stream(path, buffer_size=TAR_BUFFER_BYTES) as stream,
                tarfile.open(fileobj=stream, mode="r|") as tar,
            ):
                for member in tar:
                    if not member.isfile():
                        continue
                    sizes[member.name] = member.size
                    extension = _split_name(member.name)[1]
                    wanted = media_kind(member.name) != "unknown" or extension == "txt"
                    if wanted and member.size <= self.max_bytes:
                        contents[member.name] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            return [_media_row(uri, "unknown", None, b"", Quarantine("corrupt", f"tar: {err}"))]
        except OSError as err:
            return [_media_row(uri, "unknown", None, b"", Quarantine("unreadable", str(err)))]
        return [
            self._member_row(uri, name, caption, sizes, contents)
            for name, caption in pair_sidecars(list(sizes))
        ]

    def _member_row(
        self,
        tar_uri: str,
        name: str,
        caption_name: str | None,
        sizes: dict[str, int],
        contents: dict[str, bytes],
    ) -> dict[str, Any]:
        source_uri, kind = f"{tar_uri}#{name}", media_kind(name)
        try:
            if kind == "unknown":
                raise _unsupported(name)
            if name not in contents:
                raise Quarantine(
                    "too_large", f"{sizes[name]} bytes > decode.max_bytes {self.max_bytes}"
                )
            caption = None
            if caption_name in contents:
                caption = _decode_caption(contents[caption_name], f"{tar_uri}#{caption_name}")
            return _media_row(source_uri, kind, caption, contents[name])
        except Quarantine as quarantine:
            return _media_row(source_uri, kind, None, b"", quarantine)


def _media_row(
    source_uri: str,
    kind: str,
    caption: str | None,
    data: bytes,
    quarantine: Quarantine | None = None,
) -> dict[str, Any]:
    return {
        "sample_id": sample_id(source_uri),
        "source_uri": source_uri,
        "media_kind": kind,
        "caption_original": _clean(caption),
        "data": data,
        "reason": quarantine.reason if quarantine else "",
        "detail": quarantine.detail if quarantine else "",
    }
