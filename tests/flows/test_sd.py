"""SD 1.x/2.x through SDXL's UNet path: a tiny StableDiffusionPipeline bundle (one CLIP, a UNet
without added conditioning, PNDM) that loads in plain diffusers; the staged text encoder ->
denoiser -> VAE decode giving the pipeline's images (nothing pooled, "" encoded for a missing
negative prompt, PNDM's multistep); and a training step of its noise-prediction objective
whose export the pipeline samples (prep and the Ray Train loop are SDXL's, tested there)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from actors.families import SD, Family, family_of
from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, VaeDecoder
from flows.models import build_tiny_bundles
from flows.objectives import NoisePrediction, training_objective
from schemas.config import TrainConfig, load_config

HEIGHT, WIDTH = 32, 48
NUM_STEPS = 5
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]
CASES = (  # (prompt, negative prompt, seed, guidance)
    ("a red circle on the left", None, 1, 7.5),
    ("a blue square at the top", "blurry", 2, 3.5),
    ("a green triangle", None, 3, 1.0),  # no unconditional pass
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["sd"])["sd"]


def sd_pipeline(bundle_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(bundle_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_the_tiny_bundle_is_sd_and_its_facts_are_the_pipelines(bundle):
    assert family_of(bundle) is SD and training_objective(SD) is NoisePrediction
    pipe = sd_pipeline(bundle)
    assert SD.multiples(bundle).latent == pipe.vae_scale_factor == 8
    assert SD.text_widths(pipe.unet.config) == (32, None)  # nothing pooled
    assert not SD.zero_negative(pipe) and SD.guidance(pipe.unet.config) == "cfg"
    assert set(SD.tokenize(pipe, ["a cat"], 0)) == {"clip"}


def test_staged_generation_equals_the_sd_pipeline(bundle):
    embeddings = PromptEncoder(bundle).encode([c[0] for c in CASES], [c[1] for c in CASES])
    assert embeddings[0].pooled_prompt_embeds is None
    assert embeddings[0].negative_prompt_embeds.abs().sum() > 0  # "" encoded, not zeros
    requests = [
        DenoiseRequest(
            e, seed=seed, guidance_scale=g, height=HEIGHT, width=WIDTH,
            num_inference_steps=NUM_STEPS,
        )
        for e, (_, _, seed, g) in zip(embeddings, CASES, strict=True)
    ]  # fmt: skip
    images = VaeDecoder(bundle).decode(Denoiser(bundle).denoise(requests), output_type="float32")

    pipe = sd_pipeline(bundle)
    for (prompt, negative, seed, guidance), image in zip(CASES, images, strict=True):
        expected = pipe(
            prompt=prompt, negative_prompt=negative, height=HEIGHT, width=WIDTH,
            num_inference_steps=NUM_STEPS, guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).images[0]  # fmt: skip
        assert max_abs(image, expected) <= TOLERANCE
    assert max_abs(images[0], images[1]) > 0.01


@dataclass(frozen=True)
class Plan:
    """What the objective reads of a run's plan (flows.objectives.ObjectivePlan)."""

    bundle_dir: str
    bundle_uri: str
    empty_prompt: dict[str, np.ndarray]
    family: Family


def test_a_noise_prediction_step_trains_the_unet_and_exports_a_bundle_the_pipeline_samples(
    bundle, tmp_path
):
    config = load_config(
        TrainConfig,
        values={"data": str(tmp_path), "output": str(tmp_path / "run"), "bundle.uri": str(bundle)},
    )
    encoder = PromptEncoder(bundle)
    [empty] = encoder.encode([""])
    plan = Plan(str(bundle), str(bundle), {"prompt_embeds": empty.prompt_embeds.numpy()}, SD)
    objective = training_objective(SD)(config, plan, torch.device("cpu"))
    [red, blue] = encoder.encode(["a red circle", "a blue square"])
    batch = {
        "latents": torch.randn(
            2, 4, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(0)
        ),
        "prompt_embeds": torch.stack([red.prompt_embeds, blue.prompt_embeds]),
    }  # no pooled embeddings: SD's shards have none
    optimizer = torch.optim.AdamW(objective.model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in objective.model.state_dict().items()}
    loss, _ = objective.loss(objective.model, batch, torch.Generator().manual_seed(1))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in objective.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed

    objective.export(objective.model.state_dict(), tmp_path / "bundle")
    pipe = sd_pipeline(tmp_path / "bundle")
    trained = pipe.unet.state_dict()
    assert all(torch.equal(trained[k], objective.model.state_dict()[k]) for k in changed)
    image = pipe(
        "a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.shape == (HEIGHT, WIDTH, 3) and np.isfinite(image).all()
