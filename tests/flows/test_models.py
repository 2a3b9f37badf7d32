import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionUpscalePipeline, WanPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForImageClassification,
    AutoProcessor,
    AutoTokenizer,
    BlipForConditionalGeneration,
    CLIPModel,
    CLIPProcessor,
    ViTForImageClassification,
)

from flows.models import TINY_BUNDLES, build_tiny_bundles

PROMPT = "A painting of a squirrel eating a burger"
# Outside the embedded word list: capitals, an unseen word, punctuation, CJK and an emoji.
ODD_PROMPT = "Zebra-striped Quokka!! on 日本 beach 🙂 at 5pm"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"))


def file_hashes(bundle_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(bundle_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(bundle_dir.rglob("*"))
        if path.is_file()
    }


def low_res_image(size: int) -> Image.Image:
    pixels = np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_builds_every_bundle_in_its_own_folder(bundles: dict[str, Path]) -> None:
    assert tuple(bundles) == TINY_BUNDLES
    for name, bundle_dir in bundles.items():
        assert bundle_dir == bundle_dir.parent / name
        assert bundle_dir.is_dir()
    # Staging folders are gone once every bundle is in place.
    assert sorted(path.name for path in bundle_dir.parent.iterdir()) == sorted(TINY_BUNDLES)


def test_weights_are_safetensors_only(bundles: dict[str, Path]) -> None:
    for bundle_dir in bundles.values():
        suffixes = {path.suffix for path in bundle_dir.rglob("*") if path.is_file()}
        assert ".safetensors" in suffixes
        assert not suffixes & {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def test_sd3_pipeline_runs(bundles: dict[str, Path]) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(bundles["t2i"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 16

    image = pipe(
        PROMPT,
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images

    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()
    # Recorded with torch 2.13 CPU, diffusers 0.42.1, transformers 5.24 (the tokenizers'
    # vocabulary with the shapes words).
    expected_slice = np.array(
        [0.5551, 0.5500, 0.5692, 0.5362, 0.5650, 0.5592, 0.5115, 0.5336, 0.5575]
    )
    assert np.abs(image[0, -3:, -3:, -1].flatten() - expected_slice).max() < 1e-3


def test_refiner_shares_encoders_and_vae_with_t2i(bundles: dict[str, Path]) -> None:
    t2i, refiner = file_hashes(bundles["t2i"]), file_hashes(bundles["refiner"])
    weights = "diffusion_pytorch_model.safetensors"
    assert t2i[f"transformer/{weights}"] != refiner[f"transformer/{weights}"]
    del t2i[f"transformer/{weights}"], refiner[f"transformer/{weights}"]
    assert t2i == refiner

    pipe = StableDiffusion3Pipeline.from_pretrained(bundles["refiner"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT,
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()


def test_upscaler_pipeline_upscales_4x(bundles: dict[str, Path]) -> None:
    pipe = StableDiffusionUpscalePipeline.from_pretrained(bundles["upscaler"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.scaling_factor == 0.08333
    assert pipe.config.max_noise_level == 350

    image = pipe(
        PROMPT,
        image=low_res_image(16),
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images

    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()


def test_wan_pipeline_makes_video(bundles: dict[str, Path]) -> None:
    pipe = WanPipeline.from_pretrained(bundles["t2v"])
    pipe.set_progress_bar_config(disable=True)

    frames = pipe(
        PROMPT,
        negative_prompt="blurry",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).frames

    assert frames.shape == (1, 5, 16, 16, 3)
    assert np.isfinite(frames).all()


@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_captioner_generates_text(bundles: dict[str, Path], prompt: str | None) -> None:
    processor = AutoProcessor.from_pretrained(bundles["captioner"])
    model = BlipForConditionalGeneration.from_pretrained(bundles["captioner"])

    inputs = processor(images=low_res_image(48), text=prompt, return_tensors="pt")
    output_ids = model.generate(**inputs, max_new_tokens=8)
    captions = processor.batch_decode(output_ids, skip_special_tokens=True)

    assert len(captions) == 1
    assert isinstance(captions[0], str)
    assert captions[0].strip()


def test_scorer_scores_images_against_texts(bundles: dict[str, Path]) -> None:
    processor = CLIPProcessor.from_pretrained(bundles["scorer"])
    model = CLIPModel.from_pretrained(bundles["scorer"])

    inputs = processor(
        text=[PROMPT, ODD_PROMPT],
        images=[low_res_image(48), low_res_image(20), low_res_image(32)],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        logits_per_image = model(**inputs).logits_per_image

    assert logits_per_image.shape == (3, 2)
    assert torch.isfinite(logits_per_image).all()


@pytest.mark.parametrize(
    ("name", "id2label"), [("aesthetic", {0: "LABEL_0"}), ("nsfw", {0: "normal", 1: "nsfw"})]
)
def test_image_classifiers_score_images(
    bundles: dict[str, Path], name: str, id2label: dict[int, str]
) -> None:
    processor = AutoProcessor.from_pretrained(bundles[name])
    model = AutoModelForImageClassification.from_pretrained(bundles[name])
    assert isinstance(model, ViTForImageClassification)
    assert model.config.id2label == id2label

    inputs = processor(images=[low_res_image(48), low_res_image(20)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits

    assert logits.shape == (2, len(id2label))
    assert torch.isfinite(logits).all()
    # The filters rank images by these scores: they must depend on the image.
    assert not torch.equal(logits[0], logits[1])


@pytest.mark.parametrize(
    ("name", "subfolder"),
    [
        ("t2i", "tokenizer"),
        ("t2i", "tokenizer_3"),
        ("upscaler", "tokenizer"),
        ("t2v", "tokenizer"),
        ("captioner", ""),
        ("scorer", ""),
    ],
)
def test_tokenizers_round_trip_and_take_any_text(
    bundles: dict[str, Path], name: str, subfolder: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bundles[name] / subfolder)

    known = tokenizer(PROMPT.lower()).input_ids
    odd = tokenizer(ODD_PROMPT).input_ids

    # Embedded caption words are whole tokens: one per word plus the special tokens.
    assert len(known) == len(PROMPT.split()) + tokenizer.num_special_tokens_to_add()
    assert known[-1] in tokenizer.all_special_ids
    assert len(odd) > len(ODD_PROMPT.split())
    assert all(0 <= token_id < len(tokenizer) for token_id in odd)


def test_clip_tokenizer_pads_to_77_like_sd3(bundles: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(bundles["t2i"] / "tokenizer")
    input_ids = tokenizer(PROMPT, padding="max_length", max_length=77).input_ids
    assert len(input_ids) == tokenizer.model_max_length == 77
    assert input_ids[0] == tokenizer.bos_token_id
    assert input_ids[-1] == tokenizer.pad_token_id


def test_same_seed_gives_identical_files(bundles: dict[str, Path], tmp_path: Path) -> None:
    rebuilt = build_tiny_bundles(tmp_path)
    for name in TINY_BUNDLES:
        assert file_hashes(rebuilt[name]) == file_hashes(bundles[name]), name

    # Rebuilding over an existing bundle replaces it and leaves no staging folder behind.
    (rebuilt["scorer"] / "stale.txt").write_text("from an older build")
    build_tiny_bundles(tmp_path, names=["scorer"])
    assert file_hashes(rebuilt["scorer"]) == file_hashes(bundles["scorer"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(TINY_BUNDLES)


def test_different_seed_gives_different_weights(bundles: dict[str, Path], tmp_path: Path) -> None:
    other = build_tiny_bundles(tmp_path, seed=1)
    for name in TINY_BUNDLES:
        for weights in sorted(bundles[name].rglob("*.safetensors")):
            relative = weights.relative_to(bundles[name])
            state = load_file(weights)
            other_state = load_file(other[name] / relative)
            assert state.keys() == other_state.keys()
            assert any(not torch.equal(state[key], other_state[key]) for key in state), relative


def test_unknown_bundle_name_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pixart"):
        build_tiny_bundles(tmp_path, names=["t2i", "pixart"])
    assert not any(tmp_path.iterdir())
