"""list_inputs and FetchMedia: folders with sidecars, WebDataset tars, parquet / jsonl
listings, local and s3:// (loopback S3 server)."""

import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import features

from actors.sources import MEDIA_COLUMNS, FetchMedia, list_inputs, media_kind
from cluster.storage import Storage
from flows.samples import (
    WEBDATASET_SAMPLES,
    build_sample_corpus,
    write_listing,
    write_webdataset_tar,
)
from schemas.config import PrepConfig
from schemas.errors import RaygenError

ITEM_KEYS = ("item_uri", "kind", "caption_uri", "caption")
TAR_NAME = "webdataset_00000.tar"


def item_batch(items: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.array([item[key] for item in items], dtype=object) for key in ITEM_KEYS}


def fetch(config: PrepConfig, items: list[dict]) -> dict[str, np.ndarray]:
    return FetchMedia(config.decode, config.storage)(item_batch(items))


def by_name(rows: dict[str, np.ndarray], root: str) -> dict[str, dict]:
    """Rows keyed by source_uri relative to ``root`` (a tar member: "x.tar#key.jpg")."""
    names = [uri.removeprefix(f"{root}/") for uri in rows["source_uri"]]
    return {name: {k: v[i] for k, v in rows.items()} for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(root, num_videos=1)
    return root


def test_folder_items_pair_captions_and_keep_stray_files(tmp_path):
    for name in [
        "a.jpg",
        "a.txt",
        "a.json",
        "b.PNG",
        "c.txt",
        "d.gif",
        "d.txt",
        "shard.tar",
        "sub/e.mp4",
        "sub/e.txt",
        "notes",
    ]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list_inputs(PrepConfig(input=str(tmp_path)), Storage())
    root = str(tmp_path)
    summary = [
        (
            i["item_uri"].removeprefix(f"{root}/"),
            i["kind"],
            i["caption_uri"] and i["caption_uri"].removeprefix(f"{root}/"),
        )
        for i in items
    ]
    assert summary == [
        ("a.jpg", "file", "a.txt"),
        ("b.PNG", "file", None),
        ("c.txt", "file", None),  # a caption of nothing: quarantined, not dropped
        ("d.gif", "file", "d.txt"),
        ("notes", "file", None),
        ("shard.tar", "tar", None),
        ("sub/e.mp4", "file", "sub/e.txt"),
    ]
    assert all(item["caption"] is None for item in items)


def test_every_format_pil_reads_is_an_image_by_its_extension():
    names = ["a.GIF", "b.bmp", "c.tif", "d.tiff", "e.webp", "f.jpeg", "g.png", "h.ppm", "i.tga"]
    if features.check("avif"):
        names.append("j.avif")
    assert {name: media_kind(name) for name in names} == dict.fromkeys(names, "image")
    assert {name: media_kind(name) for name in ["v.mp4", "v.MOV", "v.mpg"]} == {
        "v.mp4": "video",
        "v.MOV": "video",
        "v.mpg": "unknown",  # PIL reads only MPEG's header; not a video we decode either
    }
    # PIL writes PDFs but reads none; HDF5 is a stub that needs a handler of one's own.
    assert media_kind("doc.pdf") == media_kind("cube.h5") == media_kind("notes") == "unknown"


def test_unsupported_formats_say_why(tmp_path):
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "cube.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    config = PrepConfig(input=str(tmp_path))
    named = by_name(fetch(config, list_inputs(config, Storage())), str(tmp_path))
    assert {name: row["reason"] for name, row in named.items()} == {
        "cube.h5": "unsupported_format",
        "doc.pdf": "unsupported_format",
    }
    assert named["doc.pdf"]["detail"] == "extension 'pdf'"
    assert "cannot decode HDF5" in named["cube.h5"]["detail"]


def test_relative_input_is_made_absolute_and_empty_input_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    [item] = list_inputs(PrepConfig(input="data"), Storage())
    assert item["item_uri"] == str(tmp_path / "data" / "a.jpg")
    with pytest.raises(RaygenError, match="no files found"):
        list_inputs(PrepConfig(input=str(tmp_path / "missing")), Storage())


def test_files_are_fetched_with_their_captions(corpus):
    config = PrepConfig(input=str(corpus))
    rows = fetch(config, list_inputs(config, Storage()))
    assert tuple(rows) == MEDIA_COLUMNS
    assert rows["item_sources"].dtype == np.int32
    assert all(rows[name].dtype == object for name in MEDIA_COLUMNS if name != "item_sources")
    named = by_name(rows, str(corpus))

    photo = named["photo_astronaut.png"]
    assert photo["data"] == (corpus / "photo_astronaut.png").read_bytes()
    assert photo["caption_original"] == (corpus / "photo_astronaut.txt").read_text().strip()
    assert photo["media_kind"] == "image" and photo["reason"] == ""
    assert photo["sample_id"] == hashlib.sha256(photo["source_uri"].encode()).hexdigest()[:16]
    assert named["video_00.mp4"]["media_kind"] == "video"
    assert named["unusual_cmyk.jpg"]["caption_original"] is None
    assert named["broken_empty.jpg"]["data"] == b"" and named["broken_empty.jpg"]["reason"] == ""
    assert named["unusual_animation.gif"]["media_kind"] == "image"
    pdf = named["broken_document.pdf"]
    assert (pdf["media_kind"], pdf["reason"], pdf["data"]) == ("unknown", "unsupported_format", b"")
    assert len(set(rows["sample_id"])) == len(rows["sample_id"])


def test_tar_expands_to_one_row_per_sample(corpus):
    config = PrepConfig(input=str(corpus))
    items = [item for item in list_inputs(config, Storage()) if item["kind"] == "tar"]
    rows = fetch(config, items)
    tar_uri = str(corpus / TAR_NAME)
    keys = [f"{index:09d}" for index in range(WEBDATASET_SAMPLES)]
    assert list(rows["source_uri"]) == [f"{tar_uri}#{key}.jpg" for key in keys]
    assert set(rows["item_uri"]) == {tar_uri}
    assert set(rows["item_sources"]) == {WEBDATASET_SAMPLES}
    assert set(rows["reason"]) == {""}
    with tarfile.open(tar_uri) as tar:
        for key, data, caption in zip(keys, rows["data"], rows["caption_original"], strict=True):
            assert data == tar.extractfile(f"{key}.jpg").read()
            assert caption == tar.extractfile(f"{key}.txt").read().decode()


def test_unreadable_tars_quarantine_the_tar_and_odd_members_their_row(tmp_path):
    whole = tmp_path / "whole.tar"
    write_webdataset_tar(
        whole,
        {
            "a": {"jpg": b"\xff\xd8" * 400, "txt": b"  a cat \n", "json": b"{}"},
            "b": {"pdf": b"%PDF-1.4"},
            "c": {"txt": b"a caption of nothing"},
            "d": {"png": b"p" * 4000, "txt": b"\xff\xfe not utf-8"},
        },
    )
    data = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1200])  # inside a member
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    config = PrepConfig(input=str(tmp_path), decode={"max_bytes": 3000})
    rows = fetch(config, list_inputs(config, Storage()))
    outcome = {
        name: (row["media_kind"], row["reason"], row["caption_original"], row["item_sources"])
        for name, row in by_name(rows, str(tmp_path)).items()
    }
    assert outcome == {
        "cut.tar": ("unknown", "corrupt", None, 1),
        "noise.tar": ("unknown", "corrupt", None, 1),
        "whole.tar#a.jpg": ("image", "", "a cat", 4),
        "whole.tar#b.pdf": ("unknown", "unsupported_format", None, 4),
        "whole.tar#c.txt": ("unknown", "unsupported_format", None, 4),
        "whole.tar#d.png": ("image", "too_large", None, 4),
    }
    assert "unexpected end of data" in by_name(rows, str(tmp_path))["cut.tar"]["detail"]


def test_missing_too_large_and_non_utf8_caption_files(tmp_path):
    (tmp_path / "big.jpg").write_bytes(b"x" * 101)
    (tmp_path / "ok.jpg").write_bytes(b"x" * 100)
    (tmp_path / "bad.jpg").write_bytes(b"x")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    config = PrepConfig(input=str(tmp_path), decode={"max_bytes": 100})
    items = list_inputs(config, Storage())
    items.append(
        {
            "item_uri": str(tmp_path / "gone.png"),
            "kind": "file",
            "caption_uri": None,
            "caption": "kept",
        }
    )
    named = by_name(fetch(config, items), str(tmp_path))
    assert {name: row["reason"] for name, row in named.items()} == {
        "bad.jpg": "unreadable",
        "big.jpg": "too_large",
        "gone.png": "unreadable",
        "ok.jpg": "",
    }
    assert "not UTF-8" in named["bad.jpg"]["detail"]
    assert "gone.png" in named["gone.png"]["detail"]
    assert named["gone.png"]["caption_original"] == "kept"
    assert named["big.jpg"]["data"] == b"" and len(named["ok.jpg"]["data"]) == 100


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_listings_resolve_relative_uris(corpus, tmp_path, suffix):
    listing = tmp_path / "lists" / f"corpus{suffix}"
    listing.parent.mkdir()
    relative = os.path.relpath(corpus, listing.parent)
    write_listing(
        listing,
        [
            {"uri": f"{relative}/synthetic_01.jpg", "caption": "  a listed caption "},
            {"uri": str(corpus / "photo_rocket.jpg"), "caption": None},
            {"uri": f"{relative}/{TAR_NAME}", "caption": None},
        ],
    )
    config = PrepConfig(input=str(listing))
    items = list_inputs(config, Storage())
    assert [(i["item_uri"], i["kind"]) for i in items] == [
        (str(corpus / "photo_rocket.jpg"), "file"),
        (str(corpus / "synthetic_01.jpg"), "file"),
        (str(corpus / TAR_NAME), "tar"),
    ]
    named = by_name(fetch(config, items), str(corpus))
    assert named["synthetic_01.jpg"]["caption_original"] == "a listed caption"
    assert named["synthetic_01.jpg"]["data"] == (corpus / "synthetic_01.jpg").read_bytes()
    assert named["photo_rocket.jpg"]["caption_original"] is None  # no sidecar lookup
    assert len(named) == 2 + WEBDATASET_SAMPLES


def test_listing_mistakes_are_errors(tmp_path):
    cases = {
        "no_uri.jsonl": ([{"path": "a.jpg"}], "needs a `uri` column"),
        "twice.jsonl": ([{"uri": "a.jpg"}, {"uri": "./a.jpg"}], "listed twice"),
        "number.parquet": ([{"uri": "a.jpg", "caption": 3}], "`caption` must be a string"),
    }
    for name, (rows, message) in cases.items():
        write_listing(tmp_path / name, rows)
        with pytest.raises(RaygenError, match=message):
            list_inputs(PrepConfig(input=str(tmp_path / name)), Storage())
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RaygenError, match="cannot read the listing"):
        list_inputs(PrepConfig(input=str(tmp_path / "broken.jsonl")), Storage())


def test_s3_folder_and_listing_match_local(corpus, tmp_path, s3_bucket, storage_config):
    storage = Storage(storage_config)
    remote_root = f"{s3_bucket}/corpus"
    storage.upload_dir(corpus, remote_root)
    local = PrepConfig(input=str(corpus))
    remote = PrepConfig(input=remote_root, storage=storage_config)
    local_items, remote_items = list_inputs(local, Storage()), list_inputs(remote, storage)
    assert [i["item_uri"].removeprefix(f"{remote_root}/") for i in remote_items] == [
        i["item_uri"].removeprefix(f"{corpus}/") for i in local_items
    ]
    local_rows = by_name(fetch(local, local_items), str(corpus))
    remote_rows = by_name(fetch(remote, remote_items), remote_root)
    assert remote_rows.keys() == local_rows.keys()
    for name, row in remote_rows.items():
        for column in ("media_kind", "caption_original", "data", "reason", "item_sources"):
            assert row[column] == local_rows[name][column], (name, column)
    assert remote_rows[f"{TAR_NAME}#000000001.jpg"]["source_uri"].startswith("s3://")

    # A listing on S3 with URIs relative to its own prefix; a missing object is unreadable,
    # and the message names the object, never the credentials.
    listing = tmp_path / "s3-listing.jsonl"
    write_listing(listing, [{"uri": "corpus/synthetic_00.png"}, {"uri": "corpus/gone.png"}])
    listing_uri = f"{s3_bucket}/s3-listing.jsonl"
    storage.upload_file(listing, listing_uri)
    listed = PrepConfig(input=listing_uri, storage=storage_config)
    items = list_inputs(listed, storage)
    assert [item["item_uri"] for item in items] == [
        f"{remote_root}/gone.png",
        f"{remote_root}/synthetic_00.png",
    ]
    rows = by_name(fetch(listed, items), remote_root)
    assert rows["synthetic_00.png"]["data"] == (corpus / "synthetic_00.png").read_bytes()
    assert rows["gone.png"]["reason"] == "unreadable"
    detail = rows["gone.png"]["detail"]
    assert "gone.png" in detail
    assert all(
        os.environ[key] not in detail for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    )
