"""The safety parts: prompt blocklist, NSFW image check, invisible watermark."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actors.prompt_filter import PromptFilter
from actors.safety import ImageSafetyChecker
from actors.watermark import (
    WATERMARK_BITS,
    WATERMARK_MIN_BITS,
    detect_watermark,
    embed_watermark,
    watermark_message,
)
from flows.models import build_tiny_bundles

KEY = "raygen"


def smooth_image(seed: int, height: int = 64, width: int = 96) -> np.ndarray:
    """A photo-like image: smooth gradients plus mild noise, with some saturated pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        128 + 140 * np.sin(3 * x + phase) * np.cos(2 * y - phase) for phase in rng.uniform(0, 3, 3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 4, (height, width, 3))
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def png_round_trip(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["nsfw", "aesthetic"])


def test_prompt_filter_matches_words_in_any_case_and_spacing():
    prompt_filter = PromptFilter(["forbidden fruit", "Gore"])
    assert prompt_filter.match("A FORBIDDEN-fruit tart") == "forbidden fruit"
    assert prompt_filter.match("forbidden\n  fruit") == "forbidden fruit"
    assert prompt_filter.match("so much gore!") == "Gore"
    # Unicode compatibility forms fold to the plain letters.
    assert prompt_filter.match("ｇｏｒｅ") == "Gore"
    # Words, not substrings: no Scunthorpe problem.
    assert prompt_filter.match("Gorey's drawings of forbidden places") is None
    assert prompt_filter.match("fruit that is forbidden") is None
    assert PromptFilter([]).match("anything") is None
    with pytest.raises(ValueError, match="no words"):
        PromptFilter(["  ", "ok"])


@pytest.mark.parametrize(("height", "width"), [(16, 16), (32, 48), (64, 96), (40, 36)])
def test_watermark_survives_png_and_is_invisible(height, width):
    image = smooth_image(height * width, height, width)
    marked = embed_watermark(image, KEY)
    assert marked.dtype == np.uint8 and marked.shape == image.shape

    reading = detect_watermark(png_round_trip(marked), KEY)
    assert reading.present and reading.matched_bits == WATERMARK_BITS
    assert not detect_watermark(image, KEY).present
    assert not detect_watermark(marked, "another key").present

    difference = marked.astype(np.float64) - image
    psnr = 10 * np.log10(255**2 / np.mean(difference**2))
    assert psnr > 45, psnr
    # Edge pixels outside full 8x8 blocks are left alone.
    np.testing.assert_array_equal(marked[height // 8 * 8 :], image[height // 8 * 8 :])
    np.testing.assert_array_equal(marked[:, width // 8 * 8 :], image[:, width // 8 * 8 :])


def test_watermark_survives_saturated_images():
    for value in (0, 255):
        flat = np.full((32, 32, 3), value, dtype=np.uint8)
        assert detect_watermark(embed_watermark(flat, KEY), KEY).present


def test_unmarked_images_read_as_coin_flips():
    rng = np.random.default_rng(0)
    matched = []
    for index in range(200):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        reading = detect_watermark(image if index % 2 else smooth_image(index, 32, 32), KEY)
        matched.append(reading.matched_bits)
    assert max(matched) < WATERMARK_MIN_BITS
    assert 13 < np.mean(matched) < 19  # about half of 32


def test_watermark_needs_a_uint8_rgb_image_of_a_block_or_more():
    assert watermark_message(KEY).shape == (WATERMARK_BITS,)
    assert not np.array_equal(watermark_message(KEY), watermark_message("other"))
    with pytest.raises(ValueError, match="too small"):
        embed_watermark(np.zeros((4, 64, 3), dtype=np.uint8), KEY)
    with pytest.raises(ValueError, match="uint8"):
        embed_watermark(np.zeros((16, 16, 3), dtype=np.float32), KEY)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        detect_watermark(np.zeros((16, 16), dtype=np.uint8), KEY)


def test_image_checker_blacks_out_what_scores_above_the_threshold(bundles):
    images = [smooth_image(seed, 32, 32) for seed in range(3)]
    checker = ImageSafetyChecker(bundles["nsfw"], max_nsfw_score=1.0)
    scores = checker.scores(images)
    assert len(scores) == 3 and all(0.0 <= score <= 1.0 for score in scores)
    kept, flagged = checker.check(images)
    assert flagged == [False] * 3
    for image, out in zip(images, kept, strict=True):
        np.testing.assert_array_equal(out, image)

    # A threshold between the scores flags exactly the images above it.
    checker.max_nsfw_score = float(np.median(scores))
    kept, flagged = checker.check(images)
    assert flagged == [score > checker.max_nsfw_score for score in scores]
    for image, out, bad in zip(images, kept, flagged, strict=True):
        np.testing.assert_array_equal(out, np.zeros_like(image) if bad else image)


def test_image_checker_needs_an_nsfw_label(bundles):
    with pytest.raises(ValueError, match="'nsfw'"):
        ImageSafetyChecker(bundles["aesthetic"], max_nsfw_score=0.5)


def test_image_checker_blacks_out_a_whole_video_for_one_flagged_frame(bundles):
    frames = np.stack([smooth_image(seed, 32, 32) for seed in range(4)])  # (F, H, W, 3)
    checker = ImageSafetyChecker(bundles["nsfw"], max_nsfw_score=1.0)
    kept, flagged = checker.check_video(frames)
    assert not flagged
    np.testing.assert_array_equal(kept, frames)

    # Only the top-scoring frame is above the threshold: the whole video goes.
    scores = checker.scores(list(frames))
    checker.max_nsfw_score = sorted(scores)[-2]
    kept, flagged = checker.check_video(frames)
    assert flagged
    np.testing.assert_array_equal(kept, np.zeros_like(frames))
