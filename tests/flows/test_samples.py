import hashlib

import av
from PIL import Image

from flows.samples import PHOTOS, SYNTHETIC_SIZES, build_sample_corpus


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_corpus_has_photos_synthetic_images_and_videos(tmp_path):
    counts = build_sample_corpus(tmp_path, num_videos=1)
    assert counts == {"photos": len(PHOTOS), "synthetic": len(SYNTHETIC_SIZES), "videos": 1}
    images = sorted(p for p in tmp_path.iterdir() if p.suffix in {".png", ".jpg"})
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


def test_same_seed_same_corpus(tmp_path):
    build_sample_corpus(tmp_path / "a", seed=3, num_videos=0)
    build_sample_corpus(tmp_path / "b", seed=3, num_videos=0)
    build_sample_corpus(tmp_path / "c", seed=4, num_videos=0)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
