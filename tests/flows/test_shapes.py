"""`raygen data shapes` and the detector that reads its pictures back: a seeded corpus whose
captions say what the pixels show, held-out triples that no image shows, a folder prep
decodes like any other, and a detector that names what it sees (and nothing in noise)."""

import collections
import hashlib
import json

import av
import numpy as np
import pytest
from PIL import Image, ImageFilter

from actors.decode import MediaDecoder
from actors.shape_detector import detect_image, detect_video
from actors.sources import FetchMedia, list_inputs
from cluster.storage import Storage
from flows.cli import main
from flows.shapes import MEDIA_DIR, build_shapes_corpus, read_shapes_corpus, shape_image
from schemas.config import PrepConfig
from schemas.shapes import (
    COLORS,
    CORPUS_FILE,
    DIRECTIONS,
    HELD_OUT,
    PLACES,
    SHAPES,
    ShapeCaption,
    training_triples,
)


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, build_shapes_corpus(out, count=2 * len(training_triples()), videos=8, seed=0)


def test_captions_are_exact_and_the_held_out_triples_never_train(corpus):
    out, made = corpus
    assert read_shapes_corpus(out) == made
    assert json.loads((out / CORPUS_FILE).read_text())["held_out"] == [c.text for c in HELD_OUT]
    shown = collections.Counter()
    for item in made.images:
        caption = ShapeCaption.parse((out / item.file).with_suffix(".txt").read_text())
        assert caption is not None and caption.text == item.caption
        shown[caption] += 1
        with Image.open(out / item.file) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    # Two rounds of every training triple, none of the held-out ones.
    assert set(shown) == set(training_triples()) and set(shown.values()) == {2}
    assert not set(HELD_OUT) & set(shown)
    # Held out: 12 of the 72 triples, yet every color, shape and place trains elsewhere.
    assert len(HELD_OUT) == 12 and len(training_triples()) == 60
    for category, values in (("color", COLORS), ("shape", SHAPES), ("place", PLACES)):
        assert {c.value(category) for c in training_triples()} == set(values)
    directions = [ShapeCaption.parse(item.caption).direction for item in made.videos]
    assert sorted(directions) == sorted(DIRECTIONS * 2)
    assert made.images[0].caption == "a yellow circle on the right"  # the exact form


def test_caption_parsing():
    caption = ShapeCaption.parse("  A purple triangle at the top\n")
    assert caption == ShapeCaption("purple", "triangle", place="at the top")
    moving = ShapeCaption.parse("a blue square moving up")
    assert moving == ShapeCaption("blue", "square", direction="up")
    assert moving.text == "a blue square moving up"
    for other in ("a pink circle on the left", "a red circle", "red circle on the left", ""):
        assert ShapeCaption.parse(other) is None
    with pytest.raises(ValueError, match="place or a direction"):
        ShapeCaption("red", "circle")


def test_same_seed_same_corpus_and_another_seed_another(tmp_path):
    def digest(folder):  # x264 with mbtree=0 gives the same bytes (flows/samples.py)
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.*"))
        }

    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        build_shapes_corpus(tmp_path / name, count=12, size=32, videos=2, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_prep_decodes_every_file_with_its_caption(corpus):
    out, made = corpus
    # The bucket step the tiny bundles give (VAE downscale 8 x patch 2); no bundle is loaded.
    prep = PrepConfig(input=str(out / MEDIA_DIR), buckets={"step": 16})
    items = list_inputs(prep, Storage())
    assert len(items) == len(made.images) + len(made.videos)
    batch = {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}
    decoded = MediaDecoder(prep.decode, prep.buckets)(FetchMedia(prep.decode, prep.storage)(batch))
    assert set(decoded["status"]) == {"ok"}, set(decoded["reason"])
    captions = {item.file: item.caption for item in [*made.images, *made.videos]}
    for uri, caption in zip(decoded["source_uri"], decoded["caption_original"], strict=True):
        assert caption == captions[f"{MEDIA_DIR}/{uri.rsplit('/', 1)[-1]}"]
    kinds = collections.Counter(np.asarray(p).shape[0] > 1 for p in decoded["pixels"])
    assert kinds[False] == len(made.images) and kinds[True] >= len(made.videos)


def _accuracy(pairs) -> dict[str, float]:
    right, total = collections.Counter(), collections.Counter()
    for detection, caption in pairs:
        for category, correct in detection.matches(caption).items():
            right[category] += correct
            total[category] += 1
    return {category: right[category] / total[category] for category in total}


@pytest.mark.parametrize("size", [32, 64])
def test_the_detector_reads_renderings_sharp_and_blurred(size):
    rng = np.random.default_rng(size)
    captions = training_triples() + list(HELD_OUT)
    images = [(shape_image(c, size, rng), c) for c in captions * 4]
    sharp = _accuracy((detect_image(np.asarray(image)), c) for image, c in images)
    # A blurry rendering is what a half-trained model draws.
    blur = ImageFilter.GaussianBlur(size / 32)
    blurred = _accuracy((detect_image(np.asarray(image.filter(blur))), c) for image, c in images)
    assert min(sharp.values()) >= 0.98 and min(blurred.values()) >= 0.98, (sharp, blurred)


@pytest.mark.parametrize("size", [32, 64])
def test_a_fringe_along_a_squares_edge_is_not_part_of_it(size):
    # What a small autoencoder makes of a square (the demo's, 5 of 80 corpus squares): its
    # corners rounded off, and a partial line of its color one pixel outside an edge, which
    # must not make its box rounder still.
    rng = np.random.default_rng(size)
    squares = [c for c in training_triples() + list(HELD_OUT) if c.shape == "square"]
    for index, caption in enumerate(squares * 2):
        image = np.asarray(shape_image(caption, size, rng)).copy()
        background = image[0, 0].copy()
        foreground = np.linalg.norm(image - background.astype(float), axis=-1) > 90
        rows = np.flatnonzero(foreground.any(axis=1))
        cols = np.flatnonzero(foreground.any(axis=0))
        color = image[rows[len(rows) // 2], cols[len(cols) // 2]].copy()
        for row in (rows[0], rows[-1]):  # each corner's pixel off: a rounded corner
            for col in (cols[0], cols[-1]):
                image[row, col] = background
        assert detect_image(image).shape == "square", caption
        middle = slice(cols[0] + 2 * len(cols) // 5, cols[-1] + 1 - 2 * len(cols) // 5)
        if index % 2:  # above the top edge, else beside the right one
            image[rows[0] - 1, middle] = color
        else:
            image[
                rows[0] + 2 * len(rows) // 5 : rows[-1] + 1 - 2 * len(rows) // 5, cols[-1] + 1
            ] = color
        assert detect_image(image).shape == "square", (caption, index)


def test_the_detector_reads_the_direction_of_videos(corpus):
    out, made = corpus
    pairs = [
        (detect_video(_frames(out / i.file)), ShapeCaption.parse(i.caption)) for i in made.videos
    ]
    accuracy = _accuracy(pairs)
    assert set(accuracy) == {"color", "shape", "direction"} and min(accuracy.values()) >= 0.98
    still = np.repeat(_frames(out / made.videos[0].file)[:1], 9, axis=0)  # (9, H, W, 3)
    assert detect_video(still).direction is None


def test_the_detector_sees_nothing_in_noise():
    # Against random captions, noise scores at most chance: here it names nothing at all.
    rng = np.random.default_rng(0)
    captions = training_triples()
    pairs = []
    for index in range(120):
        noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        if index % 2:  # smooth noise: blobs of colour, no plain background
            noise = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)))
        pairs.append((detect_image(noise), captions[index % len(captions)]))
    chance = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "place": 1 / len(PLACES)}
    accuracy = _accuracy(pairs)
    assert all(accuracy[c] <= chance[c] + 0.05 for c in chance), accuracy
    blank = np.full((64, 64, 3), 236, dtype=np.uint8)
    assert detect_image(blank).color is None  # a plain background shows no shape


def test_cli_writes_the_corpus_and_refuses_a_size_with_no_room(tmp_path, capsys):
    assert (
        main(["data", "shapes", "--out", str(tmp_path / "c"), "--count", "3", "--size", "32"]) == 0
    )
    assert "3 images and 0 videos of 32x32" in capsys.readouterr().out
    assert len(list((tmp_path / "c" / MEDIA_DIR).glob("shape_*.png"))) == 3
    assert main(["data", "shapes", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert "size 8: at least 16 pixels" in capsys.readouterr().err
