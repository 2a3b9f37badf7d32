"""The SDXL family: a tiny StableDiffusionXLPipeline bundle (two CLIP encoders, a UNet with
size conditioning, Euler) that loads in plain diffusers; the staged text encoders ->
denoiser -> VAE decode giving the pipeline's images (zeros for a missing negative prompt,
Euler's input scaling and initial sigma, the six time ids); prep with SDXL's encoders, and
train with its noise-prediction objective (min-SNR, the time ids from prep's sizes and crops)
to a bundle, or a LoRA, that the pipeline loads. SDXL's refiner (StableDiffusionXLImg2ImgPipeline:
CLIP-G alone, aesthetic-score time ids) continues the base's latents as diffusers' two-pipeline
recipe does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from actors.families import SDXL, SDXL_REFINER, family_of, latent_space
from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, VaeDecoder
from flows.distill import run_distill
from flows.models import build_tiny_bundles
from flows.objectives import add_lora, export_lora
from flows.prep import run_prep
from flows.shapes import build_shapes_corpus
from flows.shard_reader import embeddings_and_latents
from flows.train import run_train
from schemas.config import (
    AdapterConfig,
    ConfigError,
    DistillConfig,
    PrepConfig,
    TrainConfig,
    load_config,
)

HEIGHT, WIDTH = 32, 48
PROMPT = "a red circle on the left"
NUM_STEPS = 5
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]
# (prompt, negative prompt, seed, guidance): a missing negative prompt is zeros in SDXL.
CASES = (
    ("a red circle on the left", None, 1, 5.0),
    ("a blue square at the top", "blurry", 2, 3.5),
    ("a green triangle", None, 3, 1.0),  # no unconditional pass
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["sdxl", "sdxl-refiner"])


@pytest.fixture(scope="module")
def bundle(bundles: dict[str, Path]) -> Path:
    return bundles["sdxl"]


def sdxl_pipeline(bundle_dir: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(bundle_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_the_tiny_bundle_is_sdxl_and_its_facts_are_the_pipelines(bundle):
    assert family_of(bundle) is SDXL
    pipe = sdxl_pipeline(bundle)
    unet = pipe.unet.config
    assert SDXL.multiples(bundle).latent == pipe.vae_scale_factor == 8
    assert SDXL.latent_channels(unet) == pipe.vae.config.latent_channels == 4
    # Both CLIPs' penultimate states (32 + 48), and CLIP-G's projection as the pooled input.
    assert SDXL.text_widths(unet) == (80, pipe.text_encoder_2.config.projection_dim)
    assert SDXL.zero_negative(pipe) and SDXL.guidance(unet) == "cfg"
    ids = pipe._get_add_time_ids(
        (64, 96), (8, 4), (32, 48), torch.float32, pipe.text_encoder_2.config.projection_dim
    )
    assert ids.tolist() == [SDXL.time_ids((64, 96), (8, 4), (32, 48))]
    tokens = SDXL.tokenize(pipe, ["a cat"], 0)
    assert set(tokens) == {"clip_l", "clip_g"} and tokens["clip_g"].shape == (1, 77)


def test_staged_generation_equals_the_sdxl_pipeline(bundle):
    encoder = PromptEncoder(bundle)
    embeddings = encoder.encode([c[0] for c in CASES], [c[1] for c in CASES])
    # The pipeline's stand-in for a missing negative prompt: zeros, not "" encoded.
    assert not embeddings[0].negative_prompt_embeds.any()
    assert embeddings[1].negative_prompt_embeds.abs().sum() > 0
    requests = [
        DenoiseRequest(
            e,
            seed=seed,
            guidance_scale=g,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=NUM_STEPS,
        )
        for e, (_, _, seed, g) in zip(embeddings, CASES, strict=True)
    ]
    latents = Denoiser(bundle).denoise(requests)
    assert [tuple(sample.shape) for sample in latents] == [(4, HEIGHT // 8, WIDTH // 8)] * 3
    images = VaeDecoder(bundle).decode(latents, output_type="float32")

    pipe = sdxl_pipeline(bundle)
    for (prompt, negative, seed, guidance), image in zip(CASES, images, strict=True):
        expected = pipe(
            prompt=prompt,
            negative_prompt=negative,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=NUM_STEPS,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        assert max_abs(image, expected) <= TOLERANCE
    assert max_abs(images[0], images[1]) > 0.01


def test_the_tiny_refiner_is_sdxls_refiner_in_its_latent_space(bundles):
    refiner = bundles["sdxl-refiner"]
    assert family_of(refiner) is SDXL_REFINER
    assert latent_space(refiner) == latent_space(bundles["sdxl"])
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    unet = pipe.unet.config
    # CLIP-G's penultimate states alone; pooled CLIP-G then five ids as the added input.
    assert SDXL_REFINER.text_widths(unet) == (48, pipe.text_encoder_2.config.projection_dim)
    assert not SDXL_REFINER.zero_negative(pipe)
    positive, negative = SDXL_REFINER.aesthetic_scores(pipe)
    ids, negative_ids = pipe._get_add_time_ids(
        (32, 48), (0, 0), (32, 48), positive, negative, (32, 48), (0, 0), (32, 48),
        torch.float32, pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    assert ids.tolist() == [SDXL_REFINER.time_ids((32, 48), (0, 0), (32, 48), positive)]
    assert negative_ids.tolist() == [SDXL_REFINER.time_ids((32, 48), (0, 0), (32, 48), negative)]
    assert set(SDXL_REFINER.tokenize(pipe, ["a cat"], 0)) == {"clip_g"}


def test_staged_base_then_refiner_equals_the_two_pipeline_recipe(bundles):
    """diffusers' documented ensemble of expert denoisers: the base runs the first 80% of the
    schedule (``denoising_end``) and hands its latents to the refiner, which runs the rest
    (``denoising_start``) with its own text encoder and aesthetic-score time ids."""
    base_dir, refiner_dir = bundles["sdxl"], bundles["sdxl-refiner"]
    cases = CASES[:2]
    steps, handoff = 10, 0.8
    base_embeddings = PromptEncoder(base_dir).encode([c[0] for c in cases], [c[1] for c in cases])
    refiner_embeddings = PromptEncoder(refiner_dir).encode(
        [c[0] for c in cases], [c[1] for c in cases]
    )
    # The refiner encodes a missing negative prompt as "" (force_zeros_for_empty_prompt off).
    assert refiner_embeddings[0].negative_prompt_embeds.abs().sum() > 0

    def requests(embeddings, latents=(None, None), **span):
        return [
            DenoiseRequest(
                e, seed=seed, guidance_scale=g, height=HEIGHT, width=WIDTH,
                num_inference_steps=steps, latents=sample, **span,
            )
            for e, sample, (_, _, seed, g) in zip(embeddings, latents, cases, strict=True)
        ]  # fmt: skip

    handed = Denoiser(base_dir).denoise(requests(base_embeddings, denoising_end=handoff))
    refined = Denoiser(refiner_dir).denoise(
        requests(refiner_embeddings, handed, denoising_start=handoff)
    )
    images = VaeDecoder(base_dir).decode(refined, output_type="float32")

    base = sdxl_pipeline(base_dir)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    refiner.set_progress_bar_config(disable=True)
    for (prompt, negative, seed, guidance), sample, image in zip(
        cases, handed, images, strict=True
    ):
        settings = {"prompt": prompt, "negative_prompt": negative, "guidance_scale": guidance}
        latents = base(
            **settings, height=HEIGHT, width=WIDTH, num_inference_steps=steps,
            denoising_end=handoff, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images  # fmt: skip
        assert max_abs(sample, latents[0]) <= TOLERANCE  # latents of magnitude ~10
        expected = refiner(
            **settings, image=latents, num_inference_steps=steps, denoising_start=handoff,
            output_type="np", generator=torch.Generator().manual_seed(seed),
        ).images[0]  # fmt: skip
        assert max_abs(image, expected) <= TOLERANCE


@pytest.mark.slow
def test_prep_then_train_with_noise_prediction_exports_a_bundle_the_pipeline_samples(
    ray_local, bundle, tmp_path
):
    build_shapes_corpus(tmp_path / "shapes", count=8, size=32)
    prep = load_config(
        PrepConfig,
        values={
            "input": str(tmp_path / "shapes" / "train"),
            "output": str(tmp_path / "shards"),
            "bundle.uri": str(bundle),
            "buckets.resolution": 32,
        },
        overrides=["video_bundle=null", "caption.model=null", "filters.scorer=null"],
    )
    assert run_prep(prep).num_written == 8
    # Prep stored the pipeline's own conditioning: both CLIPs' states and CLIP-G's pooled one.
    table = pq.read_table(next((tmp_path / "shards").rglob("*.parquet"))).slice(0, 2)
    stored = embeddings_and_latents(table)
    pipe = sdxl_pipeline(bundle)
    captions = [str(c) for c in table.column("caption_original").to_pylist()]
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            captions, do_classifier_free_guidance=False
        )
    assert max_abs(stored["prompt_embeds_original"], prompt_embeds) <= 1e-5
    assert max_abs(stored["pooled_prompt_embeds_original"], pooled) <= 1e-5
    # The shapes corpus is drawn at 32 px: uncropped, its time ids are (32, 32, 0, 0, 32, 32).
    assert stored["size_crop"].tolist()[0] == [32, 32, 0, 0, 32, 32]

    def train(output: str, **values) -> Path:
        config = load_config(
            TrainConfig,
            values={
                "data": str(tmp_path / "shards"),
                "output": str(tmp_path / output),
                "bundle.uri": str(bundle),
                "num_workers": 1,
                "cpus_per_worker": 0.5,
                "batch_size": 4,
                "max_steps": 2,
                "checkpoint_every": 2,
                **values,
            },
        )
        return Path(run_train(config).bundle)

    trained = sdxl_pipeline(train("run", snr_gamma=5.0))
    before = UNet2DConditionModel.from_pretrained(bundle, subfolder="unet")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            trained.unet.state_dict().values(), before.state_dict().values(), strict=True
        )
    )
    image = trained(
        prompt=PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    # A LoRA on the UNet is written as SDXL's own loader reads it.
    unet = UNet2DConditionModel.from_pretrained(bundle, subfolder="unet")
    add_lora(unet, AdapterConfig(rank=4))
    export_lora(SDXL, str(bundle), AdapterConfig(rank=4), unet.state_dict(), tmp_path / "lora")
    pipe.load_lora_weights(tmp_path / "lora")
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}

    # Distillation is for flow-matching teachers: refused, naming the teacher.
    distill = load_config(
        DistillConfig,
        values={
            "data": str(tmp_path / "shards"),
            "output": str(tmp_path / "distill"),
            "teacher.uri": str(bundle),
            "num_workers": 1,
            "batch_size": 4,
        },
    )
    with pytest.raises(ConfigError, match="teacher: .*StableDiffusionXLPipeline"):
        run_distill(distill)
