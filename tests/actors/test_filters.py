"""Filters: scores equal the models' own outputs; thresholds filter with a reason, in order."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification, AutoProcessor, CLIPModel

from actors.batches import rows_to_batch
from actors.filters import Filters
from flows.models import build_tiny_bundles
from schemas.config import FilterConfig, ModelRef, StorageConfig
from tests.actors.rows import clip_pixels, decoded_row, image_pixels, quarantined_row


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(
        tmp_path_factory.mktemp("bundles"), names=["scorer", "aesthetic", "nsfw"]
    )


def make_filters(bundles: dict[str, Path], **filters) -> Filters:
    refs = {name: ModelRef(uri=str(bundles[name])) for name in ("scorer", "aesthetic", "nsfw")}
    return Filters(FilterConfig(**{**refs, **filters}), StorageConfig())


@pytest.fixture(scope="module")
def scoring(bundles: dict[str, Path]) -> Filters:
    """Every model, no threshold: scores only."""
    return make_filters(bundles)


def mixed_rows() -> list[dict]:
    return [
        decoded_row("img-square", image_pixels(32, 32, seed=1), "a red square"),
        quarantined_row("broken"),
        decoded_row("img-wide", image_pixels(48, 32, seed=2), "a green field under a blue sky"),
        decoded_row("img-uncaptioned", image_pixels(32, 32, seed=3), caption=None),
        decoded_row("clip", clip_pixels(5, 16, 16, seed=4), "a dog running on the beach"),
    ]


def test_scores_equal_the_models_outputs(scoring: Filters, bundles: dict[str, Path]) -> None:
    rows = mixed_rows()
    out = scoring(rows_to_batch(rows))

    scored = [0, 2, 3, 4]
    # An image is its only frame; a clip is scored on its middle frame.
    frames = [rows[i]["pixels"][len(rows[i]["pixels"]) // 2] for i in scored]
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(bundles["scorer"])
        inputs = AutoProcessor.from_pretrained(bundles["scorer"])(
            images=[frames[0], frames[1], frames[3]],
            text=[
                rows[0]["caption_original"],
                rows[2]["caption_original"],
                rows[4]["caption_original"],
            ],
            return_tensors="pt",
            padding=True,
        )
        # Cosine similarity: CLIP's logits without its learned temperature.
        expected_clip = clip(**inputs).logits_per_image.diagonal() / clip.logit_scale.exp()
        aesthetic = AutoModelForImageClassification.from_pretrained(bundles["aesthetic"])
        pixel_values = AutoProcessor.from_pretrained(bundles["aesthetic"])(
            images=frames, return_tensors="pt"
        ).pixel_values
        expected_aesthetic = aesthetic(pixel_values=pixel_values).logits[:, 0]
        nsfw = AutoModelForImageClassification.from_pretrained(bundles["nsfw"])
        expected_nsfw = nsfw(pixel_values=pixel_values).logits.softmax(-1)[:, 1]

    for column in ("clip_score", "aesthetic_score", "nsfw_score"):
        assert out[column].dtype == np.float32
    np.testing.assert_allclose(out["clip_score"][[0, 2, 4]], expected_clip.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        out["aesthetic_score"][scored], expected_aesthetic.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(out["nsfw_score"][scored], expected_nsfw.numpy(), atol=1e-6)
    # No caption: no CLIP score. Not ok: no score at all, and the row is untouched.
    assert np.isnan(out["clip_score"][3])
    assert np.isnan([out[c][1] for c in ("clip_score", "aesthetic_score", "nsfw_score")]).all()
    assert list(out["status"]) == ["ok", "quarantined", "ok", "ok", "ok"]
    assert (out["reason"][1], out["detail"][1]) == ("truncated", "image file is truncated")
    assert list(out["sample_id"]) == [row["sample_id"] for row in rows]
    for index, row in enumerate(rows):
        assert out["pixels"][index] is row["pixels"]


def test_thresholds_filter_with_the_first_failing_reason(
    scoring: Filters, bundles: dict[str, Path]
) -> None:
    rows = [
        decoded_row("small", image_pixels(32, 32, seed=1), original_size=(20, 200)),
        decoded_row("off-caption", image_pixels(32, 32, seed=2), "a red square"),
        *(decoded_row(f"plain-{i}", image_pixels(32, 32, seed=10 + i), None) for i in range(3)),
        quarantined_row("broken"),
    ]
    scores = scoring(rows_to_batch(rows))
    # Thresholds between the measured scores: the plain image with the lowest aesthetic
    # score fails that check; of the other two, the one more likely NSFW fails that one.
    aesthetic = {i: float(scores["aesthetic_score"][i]) for i in (2, 3, 4)}
    ugly, *others = sorted(aesthetic, key=aesthetic.get)
    nsfw = {i: float(scores["nsfw_score"][i]) for i in others}
    clean, unsafe = sorted(nsfw, key=nsfw.get)
    filters = make_filters(
        bundles,
        min_resolution=32,
        min_clip_score=float(scores["clip_score"][1]) + 0.01,
        min_aesthetic_score=(aesthetic[ugly] + sorted(aesthetic.values())[1]) / 2,
        max_nsfw_score=(nsfw[clean] + nsfw[unsafe]) / 2,
    )

    out = filters(rows_to_batch(rows))

    reasons = {out["sample_id"][i]: out["reason"][i] for i in range(len(rows))}
    assert reasons["small"] == "min_resolution"
    assert reasons["off-caption"] == "clip_score"
    assert reasons[f"plain-{ugly - 2}"] == "aesthetic"
    assert reasons[f"plain-{unsafe - 2}"] == "nsfw"
    assert reasons[f"plain-{clean - 2}"] == ""
    assert Counter(out["status"]) == {"filtered": 4, "ok": 1, "quarantined": 1}
    assert out["detail"][0] == "shorter side 20 px < min_resolution 32 px"
    assert out["detail"][1].startswith("clip_score ") and "< min_clip_score" in out["detail"][1]
    assert "> max_nsfw_score" in out["detail"][unsafe]
    # A row below the minimum resolution is not scored.
    assert np.isnan(out["aesthetic_score"][0])
    assert (out["status"][5], out["reason"][5]) == ("quarantined", "truncated")


def test_config_mistakes_are_errors(bundles: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="filters.min_clip_score is set but filters.scorer"):
        Filters(FilterConfig(scorer=None, min_clip_score=0.2), StorageConfig())
    with pytest.raises(ValueError, match="num_labels=2"):
        make_filters(bundles, aesthetic=ModelRef(uri=str(bundles["nsfw"])))
    with pytest.raises(ValueError, match="'nsfw' in id2label"):
        make_filters(bundles, nsfw=ModelRef(uri=str(bundles["aesthetic"])))


def test_pixels_that_are_not_uint8_rgb_are_an_error(scoring: Filters) -> None:
    row = decoded_row("float", image_pixels(32, 32, seed=1).astype(np.float32))
    with pytest.raises(ValueError, match=r"float: image pixels must be uint8"):
        scoring(rows_to_batch([row]))
