"""The SDXL family: a tiny StableDiffusionXLPipeline bundle (two CLIP encoders, a UNet with
size conditioning, Euler) that loads in plain diffusers, and the staged text encoders ->
denoiser -> VAE decode giving the pipeline's images (zeros for a missing negative prompt,
Euler's input scaling and initial sigma, the six time ids)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from actors.families import SDXL, family_of
from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, VaeDecoder
from flows.models import build_tiny_bundles

HEIGHT, WIDTH = 32, 48
NUM_STEPS = 5
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]
# (prompt, negative prompt, seed, guidance): a missing negative prompt is zeros in SDXL.
CASES = (
    ("a red circle on the left", None, 1, 5.0),
    ("a blue square at the top", "blurry", 2, 3.5),
    ("a green triangle", None, 3, 1.0),  # no unconditional pass
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["sdxl"])["sdxl"]


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
