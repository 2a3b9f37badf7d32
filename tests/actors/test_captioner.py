"""Captioner: greedy captions equal the model's own generate, prompt stripped, clips by frames."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration

from actors.batches import rows_to_batch
from actors.captioner import Captioner
from flows.models import build_tiny_bundles
from schemas.config import CaptionConfig, ModelRef, StorageConfig
from tests.actors.rows import clip_pixels, decoded_row, image_pixels, quarantined_row

PROMPT = "a photo of"
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def sighted_captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BLIP bundle with a vision path that reaches the text decoder.

    The tiny bundle's vision tower starts at BlipVisionConfig's initializer_range (1e-10),
    so it captions every image alike. Re-drawing the patch embedding and strengthening
    cross-attention (seeded) makes captions depend on the image, as this test needs.
    """
    out = tmp_path_factory.mktemp("bundles")
    source = build_tiny_bundles(out, names=["captioner"])["captioner"]
    model = BlipForConditionalGeneration.from_pretrained(source)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.vision_model.embeddings.patch_embedding.weight.normal_(0, 0.02)
        for name, weight in model.text_decoder.named_parameters():
            if "crossattention" in name and name.endswith(("value.weight", "output.dense.weight")):
                weight.mul_(10)
    target = out / "sighted-captioner"
    model.save_pretrained(target)
    AutoProcessor.from_pretrained(source).save_pretrained(target)
    return target


def make_captioner(bundle: Path | None, prompt: str | None = None) -> Captioner:
    model = ModelRef(uri=str(bundle)) if bundle is not None else None
    config = CaptionConfig(model=model, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
    return Captioner(config, StorageConfig())


def reference_captions(bundle: Path, frames: list[np.ndarray], prompt: str | None) -> list[str]:
    """What transformers' own greedy generate says for each frame on its own."""
    processor = AutoProcessor.from_pretrained(bundle)
    model = BlipForConditionalGeneration.from_pretrained(bundle)
    captions = []
    for frame in frames:
        inputs = processor(images=frame, text=prompt, return_tensors="pt")
        output_ids = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        captions.append(processor.decode(output_ids[0], skip_special_tokens=True))
    return captions


def test_captions_equal_greedy_generate_and_repeat(sighted_captioner: Path) -> None:
    rows = [
        decoded_row("square", image_pixels(32, 32, seed=1)),
        quarantined_row("broken"),
        decoded_row("wide", image_pixels(48, 32, seed=2)),
    ]
    captioner = make_captioner(sighted_captioner)

    out = captioner(rows_to_batch(rows))

    frames = [rows[0]["pixels"][0], rows[2]["pixels"][0]]
    expected = reference_captions(sighted_captioner, frames, None)
    assert list(out["caption_synthetic"]) == [expected[0], None, expected[1]]
    assert expected[0] != expected[1]
    assert list(captioner(rows_to_batch(rows))["caption_synthetic"]) == list(
        out["caption_synthetic"]
    )
    assert list(out["caption_original"]) == [row["caption_original"] for row in rows]


def test_prompt_prefix_conditions_and_is_stripped(sighted_captioner: Path) -> None:
    rows = [decoded_row("square", image_pixels(32, 32, seed=1))]

    out = make_captioner(sighted_captioner, PROMPT)(rows_to_batch(rows))

    (full,) = reference_captions(sighted_captioner, [rows[0]["pixels"][0]], PROMPT)
    assert full.startswith(PROMPT + " ")
    assert out["caption_synthetic"][0] == full.removeprefix(PROMPT).strip()
    unconditional = make_captioner(sighted_captioner)(rows_to_batch(rows))
    assert out["caption_synthetic"][0] != unconditional["caption_synthetic"][0]


def test_clip_caption_is_middle_frame_then_distinct_first_and_last(
    sighted_captioner: Path,
) -> None:
    clip = clip_pixels(9, 32, 32, seed=3)
    clip[0] = 0  # a black first frame: a caption of its own
    still = np.stack([image_pixels(32, 32, seed=4)] * 5)
    rows = [decoded_row("moving", clip), decoded_row("still", still)]

    out = make_captioner(sighted_captioner)(rows_to_batch(rows))

    middle, first, last, still_caption = reference_captions(
        sighted_captioner, [clip[4], clip[0], clip[8], still[2]], None
    )
    assert first != middle
    assert out["caption_synthetic"][0] == "; ".join(dict.fromkeys([middle, first, last]))
    assert out["caption_synthetic"][1] == still_caption


def test_no_model_passes_rows_through() -> None:
    rows = [decoded_row("square", image_pixels(32, 32, seed=1)), quarantined_row("broken")]
    captioner = make_captioner(None)
    assert captioner.model is None

    out = captioner(rows_to_batch(rows))

    assert list(out["caption_synthetic"]) == [None, None]
    assert list(out["status"]) == ["ok", "quarantined"]
