import hashlib
import json
import tarfile

import av
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.samples import (
    PHOTOS,
    SYNTHETIC_SIZES,
    WEBDATASET_SAMPLES,
    build_broken_files,
    build_sample_corpus,
    write_listing,
    write_webdataset_tar,
)


def _content(path):
    """What prep reads from ``path``: an mp4's decoded frames, any other file's bytes.

    x264 wrote different bytes for the same three black frames once in a CI run (one
    encoder thread; 50 runs here gave one digest), so videos are compared by their pixels.
    """
    if path.suffix != ".mp4" or path.stat().st_size < 100:
        return path.read_bytes()
    try:
        with av.open(str(path)) as container:
            return b"".join(
                f.to_ndarray(format="rgb24").tobytes() for f in container.decode(video=0)
            )
    except av.error.FFmpegError:
        return path.read_bytes()  # the broken ones: their bytes are the content


def _digest(folder):
    return {p.name: hashlib.sha256(_content(p)).hexdigest() for p in sorted(folder.iterdir())}


def test_corpus_has_photos_synthetic_images_and_videos(tmp_path):
    counts = build_sample_corpus(tmp_path, num_videos=1)
    broken = build_broken_files(tmp_path / "broken")
    assert counts == {
        "photos": len(PHOTOS),
        "synthetic": len(SYNTHETIC_SIZES),
        "videos": 1,
        "webdataset": WEBDATASET_SAMPLES,
        "broken": sum(1 for reason in broken.values() if reason),
        "unusual": sum(1 for reason in broken.values() if not reason),
    }
    images = sorted(p for p in tmp_path.glob("*") if p.name.startswith(("photo_", "synthetic_")))
    images = [p for p in images if p.suffix in {".png", ".jpg"}]
    assert len(images) == len(PHOTOS) + len(SYNTHETIC_SIZES)
    for path in images:
        with Image.open(path) as image:
            image.verify()
        assert path.with_suffix(".txt").read_text().strip()
    sizes = {Image.open(p).size for p in images if p.name.startswith("synthetic")}
    assert sizes == set(SYNTHETIC_SIZES)
    with av.open(str(tmp_path / "video_00.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (48, 64, 3)
    # The square moves: first and last frames differ.
    assert (frames[0] != frames[-1]).any()
    # The broken and unusual files are in the corpus too, byte for byte.
    assert all(
        (tmp_path / name).read_bytes() == (tmp_path / "broken" / name).read_bytes()
        for name in broken
    )


def test_same_seed_same_corpus(tmp_path):
    build_sample_corpus(tmp_path / "a", seed=3, num_videos=0)
    build_sample_corpus(tmp_path / "b", seed=3, num_videos=0)
    build_sample_corpus(tmp_path / "c", seed=4, num_videos=0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_broken_files_are_what_their_names_say(tmp_path):
    expected = build_broken_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert (tmp_path / "broken_empty.jpg").stat().st_size == 0
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "broken_bomb.png")
    modes = {
        name: Image.open(tmp_path / name).mode for name in expected if name.startswith("unusual")
    }
    assert modes == {
        "unusual_cmyk.jpg": "CMYK",
        "unusual_16bit.png": "I;16",
        "unusual_palette_alpha.png": "P",
        "unusual_rgba.png": "RGBA",
        "unusual_exif_rotated.jpg": "RGB",
        "unusual_animation.gif": "P",
    }
    assert Image.open(tmp_path / "unusual_animation.gif").n_frames == 2
    assert Image.open(tmp_path / "unusual_exif_rotated.jpg").getexif()[0x0112] == 6


def test_webdataset_tar_has_the_img2dataset_layout(tmp_path):
    path = tmp_path / "shard.tar"
    samples = {"000": {"jpg": b"a", "txt": b"a cat", "json": b"{}"}, "001": {"jpg": b"b"}}
    write_webdataset_tar(path, samples)
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["000.jpg", "000.txt", "000.json", "001.jpg"]
        assert tar.extractfile("000.txt").read() == b"a cat"
    first = path.read_bytes()
    write_webdataset_tar(path, samples)
    assert path.read_bytes() == first


def test_listings_in_both_formats(tmp_path):
    rows = [{"uri": "a.jpg", "caption": "a cat"}, {"uri": "/data/b.png", "caption": None}]
    write_listing(tmp_path / "list.parquet", rows)
    write_listing(tmp_path / "list.jsonl", rows)
    assert pq.read_table(tmp_path / "list.parquet").to_pylist() == rows
    lines = (tmp_path / "list.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    with pytest.raises(ValueError, match="parquet or .jsonl"):
        write_listing(tmp_path / "list.csv", rows)
