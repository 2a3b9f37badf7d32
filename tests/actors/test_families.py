"""Model families: each family's facts as read from the tiny bundles' configs, the error for a
pipeline class no family has, latent normalisation round trips, and shape rules that follow
the bundle's VAE config rather than a constant."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan, StableDiffusion3Pipeline, WanPipeline

from actors.families import (
    FAMILIES,
    SD3,
    WAN_I2V,
    WAN_T2V,
    FamilyError,
    Multiples,
    component_config,
    family_of,
)
from flows.models import build_tiny_bundles
from schemas.errors import RaygenError

MAX_SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2i", "t2v", "i2v"])


def _edit_json(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_each_family_is_found_by_its_pipeline_class(bundles):
    assert set(FAMILIES) == {
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionPipeline",
        "WanPipeline",
        "WanImageToVideoPipeline",
    }
    assert family_of(bundles["t2i"]) is SD3 and SD3.pipeline is StableDiffusion3Pipeline
    assert family_of(bundles["t2v"]) is WAN_T2V and WAN_T2V.pipeline is WanPipeline
    assert (SD3.media, WAN_T2V.media) == ("image", "video")
    index = json.loads((bundles["t2v"] / "model_index.json").read_text())
    assert family_of(index) is WAN_T2V


def test_facts_read_from_the_tiny_bundles(bundles):
    # t2i: four VAE levels (8x), patch 2; text widths T5 96, pooled CLIP 32 + 48.
    assert SD3.multiples(bundles["t2i"]) == Multiples(latent=8, size=16)
    assert SD3.text_widths(component_config(bundles["t2i"], "transformer")) == (96, 80)
    vae = component_config(bundles["t2i"], "vae")
    assert SD3.latent_factors(vae) == {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    # t2v: Wan VAE 8x spatial / 4x temporal, (1, 2, 2) patches; UMT5 width 32, no pooling.
    assert WAN_T2V.multiples(bundles["t2v"]) == Multiples(latent=8, size=16, frames=4)
    assert WAN_T2V.text_widths(component_config(bundles["t2v"], "transformer")) == (32, None)
    factors = WAN_T2V.latent_factors(component_config(bundles["t2v"], "vae"))
    assert set(factors) == {"latents_mean", "latents_std"} and len(factors["latents_mean"]) == 16
    # i2v: Wan's, with 36 channels in (noise, mask, first frame) and the 16 latent ones out.
    i2v = family_of(bundles["i2v"], media="video")
    assert i2v is WAN_I2V and i2v.conditions_on_image and not WAN_T2V.conditions_on_image
    transformer = component_config(bundles["i2v"], "transformer")
    assert transformer["in_channels"] == 36 and i2v.latent_channels(transformer) == 16
    assert i2v.multiples(bundles["i2v"]) == WAN_T2V.multiples(bundles["t2v"])
    assert i2v.unloaded("image_encoders", "vae") == dict.fromkeys(
        ("text_encoder", "tokenizer", "transformer", "transformer_2")
    )


def test_the_multiples_match_what_the_pipelines_compute(bundles):
    sd3 = StableDiffusion3Pipeline.from_pretrained(bundles["t2i"], **SD3.unloaded("vae"))
    multiples = SD3.multiples(bundles["t2i"])
    assert multiples.latent == sd3.vae_scale_factor
    wan = WanPipeline.from_pretrained(bundles["t2v"], **WAN_T2V.unloaded("vae"))
    multiples = WAN_T2V.multiples(bundles["t2v"])
    assert (multiples.latent, multiples.frames) == (
        wan.vae_scale_factor_spatial,
        wan.vae_scale_factor_temporal,
    )


def test_component_groups_leave_the_rest_unloaded(bundles):
    assert SD3.unloaded("text_encoders", "tokenizers") == {"transformer": None, "vae": None}
    assert set(SD3.unloaded("tokenizers")) == {
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }
    pipe = WanPipeline.from_pretrained(bundles["t2v"], **WAN_T2V.unloaded("vae"))
    assert pipe.vae is not None and pipe.transformer is None and pipe.text_encoder is None
    assert pipe.scheduler is not None  # holds no weights: always loaded


def test_encode_prompt_is_the_pipelines_own(bundles):
    prompts = ["a red circle", ""]
    sd3 = StableDiffusion3Pipeline.from_pretrained(
        bundles["t2i"], **SD3.unloaded("text_encoders", "tokenizers")
    )
    prompt_embeds, pooled = SD3.encode_prompt(sd3, prompts, MAX_SEQUENCE_LENGTH)
    # Without gradients, as the pipeline's __call__ runs it (attention takes another kernel
    # when gradients are on, a few 1e-6 away).
    with torch.no_grad():
        expected, _, expected_pooled, _ = sd3.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # fmt: skip
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)
    assert prompt_embeds.shape == (2, 77 + MAX_SEQUENCE_LENGTH, 96)

    wan = WanPipeline.from_pretrained(
        bundles["t2v"], **WAN_T2V.unloaded("text_encoders", "tokenizers")
    )
    prompt_embeds, pooled = WAN_T2V.encode_prompt(wan, prompts, MAX_SEQUENCE_LENGTH)
    with torch.no_grad():
        expected, _ = wan.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    torch.testing.assert_close(prompt_embeds, expected, rtol=0, atol=0)
    assert pooled is None and prompt_embeds.shape == (2, MAX_SEQUENCE_LENGTH, 32)


def test_an_unknown_pipeline_class_names_the_supported_ones(bundles, tmp_path):
    bundle = shutil.copytree(bundles["t2i"], tmp_path / "pixart")
    _edit_json(bundle / "model_index.json", _class_name="PixArtSigmaPipeline")
    with pytest.raises(FamilyError, match="PixArtSigmaPipeline") as err:
        family_of(bundle)
    assert isinstance(err.value, RaygenError)
    assert str(bundle) in str(err.value)
    supported = (
        "StableDiffusion3Pipeline, FluxPipeline, StableDiffusionXLPipeline, "
        "StableDiffusionXLImg2ImgPipeline, StableDiffusionPipeline, WanPipeline, "
        "WanImageToVideoPipeline"
    )
    assert supported in str(err.value)


def test_a_bundle_of_the_other_media_kind_is_refused(bundles):
    with pytest.raises(
        FamilyError, match="WanPipeline makes videos, but this needs one that makes images"
    ):
        family_of(bundles["t2v"], media="image")
    assert family_of(bundles["t2v"], media="video") is WAN_T2V


def test_image_latents_round_trip_with_and_without_a_shift():
    latents = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    factors = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
    normalized = SD3.normalize(latents, factors)
    torch.testing.assert_close(normalized, (latents - 0.0609) * 1.5305, rtol=0, atol=0)
    torch.testing.assert_close(SD3.denormalize(normalized, factors), latents)
    # A VAE config older than SD3's has shift_factor None: scaled only.
    unshifted = {"scaling_factor": 0.13025, "shift_factor": None}
    torch.testing.assert_close(SD3.normalize(latents, unshifted), latents * 0.13025, rtol=0, atol=0)
    torch.testing.assert_close(
        SD3.denormalize(SD3.normalize(latents, unshifted), unshifted), latents
    )


def test_video_latents_round_trip_per_channel(bundles):
    vae = component_config(bundles["t2v"], "vae")
    latents = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    normalized = WAN_T2V.normalize(latents, vae)
    mean = torch.tensor(vae["latents_mean"]).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae["latents_std"]).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(normalized, (latents - mean) / std, rtol=0, atol=0)
    torch.testing.assert_close(WAN_T2V.denormalize(normalized, vae), latents)
    # The decoder's ops are WanPipeline's: divide by 1 / std, then add the mean.
    torch.testing.assert_close(
        WAN_T2V.denormalize(normalized, vae), normalized / (1.0 / std) + mean, rtol=0, atol=0
    )


def test_the_frame_rule_comes_from_the_vae_config(bundles, tmp_path):
    multiples = WAN_T2V.multiples(bundles["t2v"])
    multiples.check_frames(9)
    with pytest.raises(
        RaygenError, match=r"decode.video_num_frames: 7 frames.*4k\+1 frames \(5, 9, 13"
    ):
        multiples.check_frames(7, "decode.video_num_frames")
    assert multiples.latent_frames(9) == 3

    # The same bundle with a VAE that halves time instead: 7 frames are fine, 9 - 1 = 8 too,
    # 6 are not.
    bundle = shutil.copytree(bundles["t2v"], tmp_path / "t2v-halving")
    _edit_json(bundle / "vae" / "config.json", scale_factor_temporal=2)
    halving = WAN_T2V.multiples(bundle)
    assert halving.frames == 2
    halving.check_frames(7)
    with pytest.raises(RaygenError, match=r"2k\+1"):
        halving.check_frames(6)


def test_configs_without_a_key_read_as_the_loaded_component_sees_them(bundles, tmp_path):
    """A published checkpoint saved before a config key existed: the component's class
    default fills it, as from_pretrained does."""
    bundle = shutil.copytree(bundles["t2v"], tmp_path / "old-wan")
    config_path = bundle / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("scale_factor_temporal", "scale_factor_spatial"):
        del config[key]
    config_path.write_text(json.dumps(config))
    vae = AutoencoderKLWan.from_pretrained(bundle, subfolder="vae")
    assert component_config(bundle, "vae")["scale_factor_temporal"] == (
        vae.config.scale_factor_temporal
    )
    assert WAN_T2V.multiples(bundle) == Multiples(latent=8, size=16, frames=4)

    bundle = shutil.copytree(bundles["t2i"], tmp_path / "old-sd")
    config_path = bundle / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    del config["shift_factor"]
    config_path.write_text(json.dumps(config))
    assert AutoencoderKL.from_pretrained(bundle, subfolder="vae").config.shift_factor is None
    assert SD3.latent_factors(component_config(bundle, "vae"))["shift_factor"] is None


def test_size_check_names_the_multiple():
    Multiples(latent=8, size=16).check_size(32, 48)
    with pytest.raises(ValueError, match="multiples of 16: 24x48"):
        Multiples(latent=8, size=16).check_size(24, 48)
