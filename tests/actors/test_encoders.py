"""Text and latent encoders: parity with the diffusers pipelines' own encode_prompt and VAE
encode, mixed batches, tokens mode, and the three model stages through real Ray Data."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from diffusers import StableDiffusion3Pipeline, WanPipeline
from PIL import Image

from actors.batches import rows_to_batch
from actors.captioner import Captioner
from actors.encoders import LatentEncoder, TextEncoder, empty_prompt_embeddings, vae_factors
from actors.video import VideoImageEncoder
from flows.models import build_tiny_bundles
from flows.prep import ModelStages
from schemas.config import CaptionConfig, EncodeConfig, ModelRef, PrepConfig
from tests.actors.rows import clip_pixels, decoded_row, image_pixels, quarantined_row

MAX_SEQUENCE_LENGTH = 24
CLIP_LENGTH = 77  # positions of SD3's CLIP part, ahead of the T5 part


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(
        tmp_path_factory.mktemp("bundles"), names=["t2i", "t2v", "i2v", "captioner"]
    )


def prep_config(bundles: dict[str, Path], **encode) -> PrepConfig:
    return PrepConfig(
        bundle=ModelRef(uri=str(bundles["t2i"])),
        video_bundle=ModelRef(uri=str(bundles["t2v"])),
        caption=CaptionConfig(model=ModelRef(uri=str(bundles["captioner"])), max_new_tokens=6),
        encode=EncodeConfig(max_sequence_length=MAX_SEQUENCE_LENGTH, **encode),
    )


def stage_kwargs(config: PrepConfig) -> dict[str, Any]:
    """What prep hands TextEncoder and LatentEncoder: the encode section and the bundles."""
    return {
        "config": config.encode,
        "bundle": config.bundle,
        "video_bundle": config.video_bundle,
        "storage": config.storage,
    }


@pytest.fixture(scope="module")
def config(bundles: dict[str, Path]) -> PrepConfig:
    return prep_config(bundles, latent_std=True)


@pytest.fixture(scope="module")
def sd3(bundles: dict[str, Path]) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(bundles["t2i"])


@pytest.fixture(scope="module")
def wan(bundles: dict[str, Path]) -> WanPipeline:
    return WanPipeline.from_pretrained(bundles["t2v"])


def mixed_rows() -> list[dict]:
    """Images of two buckets, a clip, a quarantined row, and rows missing a caption."""
    rows = [
        decoded_row("square", image_pixels(32, 32, seed=1), "a red square"),
        decoded_row("wide", image_pixels(48, 32, seed=2), "a green field under a blue sky"),
        quarantined_row("broken"),
        decoded_row("clip", clip_pixels(5, 16, 16, seed=3), "a dog running on the beach"),
        decoded_row("uncaptioned", image_pixels(32, 32, seed=4), None),
        decoded_row("square-2", image_pixels(32, 32, seed=5), "two cats on a sofa"),
    ]
    synthetic = ["a small red box", "a field", None, "a dog on sand", None, "cats"]
    for row, caption in zip(rows, synthetic, strict=True):
        row["caption_synthetic"] = caption
    return rows


def sd3_embeds(sd3: StableDiffusion3Pipeline, caption: str) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = sd3.encode_prompt(
            caption,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    return prompt_embeds[0].numpy(), pooled[0].numpy()


def wan_embeds(wan: WanPipeline, caption: str) -> np.ndarray:
    with torch.no_grad():
        prompt_embeds, _ = wan.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    return prompt_embeds[0].numpy()


def test_text_embeddings_equal_the_pipelines_encode_prompt(
    config: PrepConfig, sd3: StableDiffusion3Pipeline, wan: WanPipeline
) -> None:
    rows = mixed_rows()

    out = TextEncoder(**stage_kwargs(config))(rows_to_batch(rows))

    for kind in ("original", "synthetic"):
        embeds, pooled = out[f"prompt_embeds_{kind}"], out[f"pooled_prompt_embeds_{kind}"]
        for index, row in enumerate(rows):
            caption = row[f"caption_{kind}"]
            if row["status"] != "ok" or caption is None:
                assert embeds[index].shape == (0, 0) and pooled[index].shape == (0,)
            elif row["media_kind"] == "image":
                expected_embeds, expected_pooled = sd3_embeds(sd3, caption)
                assert embeds[index].shape == (CLIP_LENGTH + MAX_SEQUENCE_LENGTH, 96)
                np.testing.assert_allclose(embeds[index], expected_embeds, atol=1e-6)
                np.testing.assert_allclose(pooled[index], expected_pooled, atol=1e-6)
            else:
                assert embeds[index].shape == (MAX_SEQUENCE_LENGTH, 32)
                np.testing.assert_allclose(embeds[index], wan_embeds(wan, caption), atol=1e-6)
                assert pooled[index].shape == (0,)
            assert embeds[index].dtype == pooled[index].dtype == np.float32


def test_latents_equal_the_vaes_encode(
    config: PrepConfig, sd3: StableDiffusion3Pipeline, wan: WanPipeline
) -> None:
    rows = mixed_rows()

    out = LatentEncoder(**stage_kwargs(config))(rows_to_batch(rows))

    assert list(out["sample_id"]) == [row["sample_id"] for row in rows]
    # Images are one frame in flight, like their pixels: (C, 1, h, w).
    expected_shapes = [
        (16, 1, 4, 4),
        (16, 1, 4, 6),
        (0, 0, 0, 0),
        (16, 2, 2, 2),
        (16, 1, 4, 4),
        (16, 1, 4, 4),
    ]
    assert [latent.shape for latent in out["latent_mean"]] == expected_shapes
    assert [latent.shape for latent in out["latent_std"]] == expected_shapes
    # The reference encodes each bucket's rows as one batch too: convolution kernels pick
    # their algorithm by batch size, and the last float bits with it.
    buckets: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if row["status"] == "ok":
            buckets.setdefault(row["bucket"], []).append(index)
    with torch.no_grad():
        for indices in buckets.values():
            # Reference input through the processors' PIL path, as a pipeline user's goes.
            if rows[indices[0]]["media_kind"] == "image":
                images = [Image.fromarray(rows[index]["pixels"][0]) for index in indices]
                latent_dist = sd3.vae.encode(sd3.image_processor.preprocess(images)).latent_dist
            else:
                videos = [[Image.fromarray(f) for f in rows[index]["pixels"]] for index in indices]
                video = wan.video_processor.preprocess_video(videos)
                latent_dist = wan.vae.encode(video).latent_dist
            for position, index in enumerate(indices):
                assert out["latent_mean"][index].dtype == np.float32
                mean, std = latent_dist.mean[position], latent_dist.std[position]
                if rows[index]["media_kind"] == "image":
                    mean, std = mean[:, None], std[:, None]  # (C, 1, h, w)
                np.testing.assert_allclose(out["latent_mean"][index], mean, atol=1e-6)
                np.testing.assert_allclose(out["latent_std"][index], std, atol=1e-6)


def test_an_image_to_video_bundle_also_stores_each_clips_first_frame(
    bundles: dict[str, Path], wan: WanPipeline
) -> None:
    """With Wan i2v as the video bundle: the same latents as with t2v (the same VAE), plus
    each clip's first frame as WanImageToVideoPipeline prepares an input image."""
    rows = mixed_rows()
    config = prep_config(bundles).model_copy(
        update={"video_bundle": ModelRef(uri=str(bundles["i2v"]))}
    )
    out = LatentEncoder(**stage_kwargs(config))(rows_to_batch(rows))
    t2v = LatentEncoder(**stage_kwargs(prep_config(bundles)))(rows_to_batch(rows))
    image_encoder = VideoImageEncoder(bundles["i2v"])
    for index, row in enumerate(rows):
        np.testing.assert_array_equal(out["latent_mean"][index], t2v["latent_mean"][index])
        if row["status"] != "ok" or row["media_kind"] != "video":
            assert out["image_embeds"][index].size == out["image_condition"][index].size == 0
            continue
        frames, height, width = row["pixels"].shape[:3]
        expected = image_encoder.encode(Image.fromarray(row["pixels"][0]), height, width, frames)
        np.testing.assert_allclose(out["image_embeds"][index], expected.image_embeds, atol=1e-6)
        np.testing.assert_allclose(out["image_condition"][index], expected.condition, atol=1e-6)
        # (4 mask + 16 latent channels, the clip's latent frames and sides)
        assert out["image_condition"][index].shape == (20, *out["latent_mean"][index].shape[1:])


def test_latent_std_only_when_configured(bundles: dict[str, Path]) -> None:
    rows = [decoded_row("square", image_pixels(32, 32, seed=1))]
    out = LatentEncoder(**stage_kwargs(prep_config(bundles)))(rows_to_batch(rows))
    assert out["latent_mean"][0].shape == (16, 1, 4, 4)
    assert "latent_std" not in out


def test_an_image_as_one_frame_or_as_a_plain_array_encodes_alike(config: PrepConfig) -> None:
    row = decoded_row("square", image_pixels(32, 32, seed=1))  # (1, H, W, 3), as decode gives
    plain = {**row, "pixels": row["pixels"][0]}  # (H, W, 3)
    two_frames = {**row, "pixels": np.concatenate([row["pixels"]] * 2)}
    encoder = LatentEncoder(**stage_kwargs(config))

    framed, unframed = (encoder(rows_to_batch([r]))["latent_mean"][0] for r in (row, plain))

    np.testing.assert_array_equal(framed, unframed)
    with pytest.raises(ValueError, match=r"square: image pixels must be uint8 with shape \(1, H"):
        encoder(rows_to_batch([two_frames]))


def test_tokens_mode_stores_what_the_encoders_read(
    bundles: dict[str, Path], sd3: StableDiffusion3Pipeline, wan: WanPipeline
) -> None:
    rows = mixed_rows()
    encoder = TextEncoder(**stage_kwargs(prep_config(bundles, text="tokens")))
    assert encoder.pipes["image"].text_encoder is None  # tokenizers only

    out = encoder(rows_to_batch(rows))

    assert not any(name.startswith("prompt_embeds") for name in out)
    ids = out["input_ids_original"]
    assert ids[2] is None and ids[4] is None and out["input_ids_synthetic"][4] is None
    image_ids, clip_ids = ids[0], ids[3]
    assert sorted(image_ids) == ["clip_g", "clip_l", "t5"] and sorted(clip_ids) == ["t5"]
    assert {name: v.shape for name, v in image_ids.items()} == {
        "clip_l": (CLIP_LENGTH,),
        "clip_g": (CLIP_LENGTH,),
        "t5": (MAX_SEQUENCE_LENGTH,),
    }
    assert all(v.dtype == np.int32 for v in (*image_ids.values(), *clip_ids.values()))
    # Fed to the bundle's encoders, the ids give the embeddings encode_prompt computes.
    caption = rows[0]["caption_original"]
    with torch.no_grad():
        t5 = sd3.text_encoder_3(torch.from_numpy(image_ids["t5"][None]).long())[0][0]
        clip_g = sd3.text_encoder_2(
            torch.from_numpy(image_ids["clip_g"][None]).long(), output_hidden_states=True
        )
        mask = torch.from_numpy(clip_ids["t5"][None] != wan.tokenizer.pad_token_id).long()
        umt5 = wan.text_encoder(torch.from_numpy(clip_ids["t5"][None]).long(), mask)
    expected_embeds, expected_pooled = sd3_embeds(sd3, caption)
    np.testing.assert_allclose(t5.numpy(), expected_embeds[CLIP_LENGTH:], atol=1e-6)
    np.testing.assert_allclose(clip_g[0][0].numpy(), expected_pooled[32:], atol=1e-6)
    expected_video = wan_embeds(wan, rows[3]["caption_original"])
    length = int(mask.sum())
    np.testing.assert_allclose(
        umt5.last_hidden_state[0, :length], expected_video[:length], atol=1e-6
    )


def test_empty_prompt_embeddings_and_vae_factors(
    config: PrepConfig, sd3: StableDiffusion3Pipeline, wan: WanPipeline
) -> None:
    empty = empty_prompt_embeddings(
        config.model_copy(
            update={"encode": EncodeConfig(text="tokens", max_sequence_length=MAX_SEQUENCE_LENGTH)}
        )
    )

    expected_embeds, expected_pooled = sd3_embeds(sd3, "")
    assert sorted(empty) == [
        "image_pooled_prompt_embeds",
        "image_prompt_embeds",
        "video_prompt_embeds",
    ]
    np.testing.assert_allclose(empty["image_prompt_embeds"], expected_embeds, atol=1e-6)
    np.testing.assert_allclose(empty["image_pooled_prompt_embeds"], expected_pooled, atol=1e-6)
    np.testing.assert_allclose(empty["video_prompt_embeds"], wan_embeds(wan, ""), atol=1e-6)
    assert all(value.dtype == np.float32 for value in empty.values())

    assert vae_factors(config) == {
        "image": {
            "scaling_factor": sd3.vae.config.scaling_factor,
            "shift_factor": sd3.vae.config.shift_factor,
        },
        "video": {
            "latents_mean": list(wan.vae.config.latents_mean),
            "latents_std": list(wan.vae.config.latents_std),
        },
    }


def test_inputs_the_vae_cannot_take_are_errors(
    config: PrepConfig, bundles: dict[str, Path]
) -> None:
    encoder = LatentEncoder(**stage_kwargs(config))
    with pytest.raises(ValueError, match="image bucket 24x20: sides must be multiples of"):
        encoder(rows_to_batch([decoded_row("odd", image_pixels(20, 24, seed=1))]))
    with pytest.raises(ValueError, match=r"needs sides that are multiples of 8 and 4k\+1 frames"):
        encoder(rows_to_batch([decoded_row("clip", clip_pixels(4, 16, 16, seed=1))]))

    images_only = prep_config(bundles).model_copy(update={"video_bundle": None})
    clip = rows_to_batch([decoded_row("clip", clip_pixels(5, 16, 16, seed=1))])
    with pytest.raises(ValueError, match="clip: a video row but config.video_bundle is null"):
        LatentEncoder(**stage_kwargs(images_only))(clip)
    with pytest.raises(ValueError, match="clip: a video row but config.video_bundle is null"):
        TextEncoder(**stage_kwargs(images_only))(clip)


def test_stages_run_in_ray_data(
    ray_local: None, config: PrepConfig, bundles: dict[str, Path]
) -> None:
    """Captioner -> TextEncoder (embeddings, then tokens) -> LatentEncoder in a Ray Data actor,
    as prep runs them on a small corpus (``ModelStages``: one actor process holds them all;
    the one-pool-per-stage layout of a large corpus runs in test_prep's S3 test): outputs come
    back as Arrow tensor and struct columns that concatenate across blocks, equal to plain
    calls."""
    rows = [
        decoded_row("square", image_pixels(32, 32, seed=1)),
        quarantined_row("broken"),
        decoded_row("wide", image_pixels(48, 32, seed=2), None),
        decoded_row("square-2", image_pixels(32, 32, seed=3), "two cats"),
    ]
    tokens_config = prep_config(bundles, text="tokens")
    stages = [
        (Captioner, {"config": config.caption, "storage": config.storage}),
        (TextEncoder, stage_kwargs(config)),
        (TextEncoder, stage_kwargs(tokens_config)),
        (LatentEncoder, stage_kwargs(config)),
    ]

    ds = ray.data.from_items(rows).map_batches(
        ModelStages,
        fn_constructor_kwargs={
            "stages": [
                (f"{stage.__module__}:{stage.__name__}", stage.__name__, 2, kwargs)
                for stage, kwargs in stages
            ]
        },
        batch_format="numpy",
        batch_size=2,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.4,
    )
    # One block: Ray concatenates every output block, which fails on columns it had to pickle.
    ds = ds.drop_columns(["pixels"]).repartition(1).materialize()
    got = sorted(ds.take_all(), key=lambda row: row["sample_id"])

    tensor_columns = (
        "latent_mean",
        "latent_std",
        "prompt_embeds_original",
        "prompt_embeds_synthetic",
        "pooled_prompt_embeds_original",
        "pooled_prompt_embeds_synthetic",
    )
    schema = ds.schema()
    for name in tensor_columns:
        arrow_type = str(schema.types[schema.names.index(name)]).lower()
        assert "tensor" in arrow_type and "pickled" not in arrow_type, (name, arrow_type)
    batch = rows_to_batch(rows)
    for stage, kwargs in stages:
        batch = stage(**kwargs)(batch)
    for row in got:
        index = list(batch["sample_id"]).index(row["sample_id"])
        assert row["caption_synthetic"] == batch["caption_synthetic"][index]
        assert row["status"] == batch["status"][index]
        for name in tensor_columns:
            # Ray's batches group the rows differently from the one plain call, and
            # convolution kernels round by batch size: equal to float32 noise.
            np.testing.assert_allclose(row[name], batch[name][index], atol=1e-5, err_msg=name)
        for name in ("input_ids_original", "input_ids_synthetic"):
            expected = batch[name][index]
            if expected is None:
                assert row[name] is None
            else:
                assert row[name].keys() == expected.keys()
                for encoder, ids in expected.items():
                    np.testing.assert_array_equal(row[name][encoder], ids)
