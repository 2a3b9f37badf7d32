"""The Flux family end to end: tiny dev-style and schnell-style bundles that load in plain
FluxPipeline; the staged text encoders -> denoiser -> VAE decode give FluxPipeline's images
(guidance embedded for dev, none for schnell, the resolution-dependent shift); prep encodes
with Flux's encoders and VAE; train trains the transformer (rectified flow, the guidance
input) and distillation's objective a few-step student (on the sigmas FluxPipeline samples at
each size), each exporting a bundle FluxPipeline loads and samples."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from actors.families import FLUX, family_of
from actors.generation import Denoiser, DenoiseRequest, PromptEncoder, VaeDecoder
from flows.distill import LatentConsistencyDistillation, student_sampling
from flows.models import build_tiny_bundles
from flows.prep import run_prep
from flows.shapes import build_shapes_corpus
from flows.shard_reader import embeddings_and_latents
from flows.train import run_train
from schemas.config import DistillConfig, PrepConfig, TrainConfig, load_config

HEIGHT, WIDTH = 32, 48  # not square, so height and width cannot be swapped unnoticed
NUM_STEPS = 4
MAX_SEQUENCE_LENGTH = 16
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]
PROMPTS = ("a red circle on the left", "a blue square at the top", "a green triangle")
SEEDS = (0, 1, 2)
GUIDANCE = (3.5, 1.0, 5.0)  # per request: a dev transformer is told each its own


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["flux", "flux-schnell"])


def flux_pipeline(bundle_dir: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(bundle_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(
    pipe: FluxPipeline, prompt: str, seed: int, height: int, width: int, **kwargs
) -> np.ndarray:
    """FluxPipeline's (H, W, 3) float32 image for one prompt, its noise seeded by ``seed``."""
    return pipe(
        prompt=prompt,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
        **kwargs,
    ).images[0]


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_the_tiny_bundles_are_flux_and_their_facts_are_the_pipelines(bundles):
    for name, guidance in (("flux", "embedded"), ("flux-schnell", "none")):
        assert family_of(bundles[name]) is FLUX
        pipe = flux_pipeline(bundles[name])
        multiples = FLUX.multiples(bundles[name])
        # FluxPipeline: the VAE's 8x, and sides multiples of twice that (the 2x2 packing).
        assert (multiples.latent, multiples.size) == (
            pipe.vae_scale_factor,
            pipe.vae_scale_factor * 2,
        )
        config = pipe.transformer.config
        assert FLUX.latent_channels(config) == pipe.vae.config.latent_channels == 16
        assert FLUX.text_widths(config) == (48, 32)  # T5 width, CLIP-L pooled width
        assert FLUX.guidance(config) == guidance
        # The family's tokens are what the pipeline's encoders are fed.
        ids = FLUX.tokenize(pipe, list(PROMPTS), MAX_SEQUENCE_LENGTH)
        assert ids["clip_l"].shape == (3, 77) and ids["t5"].shape == (3, MAX_SEQUENCE_LENGTH)


@pytest.mark.parametrize("name", ["flux", "flux-schnell"])
def test_staged_generation_equals_the_flux_pipeline(bundles, name):
    bundle = bundles[name]
    embeddings = PromptEncoder(bundle).encode(
        list(PROMPTS), max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    denoiser = Denoiser(bundle)
    requests = [
        DenoiseRequest(
            e, seed=s, guidance_scale=g, height=HEIGHT, width=WIDTH, num_inference_steps=NUM_STEPS
        )
        for e, s, g in zip(embeddings, SEEDS, GUIDANCE, strict=True)
    ]
    latents = denoiser.denoise(requests)
    # 16 latent channels at 1/8 of the image size, unpacked between stages.
    assert [tuple(sample.shape) for sample in latents] == [(16, HEIGHT // 8, WIDTH // 8)] * 3
    images = VaeDecoder(bundle).decode(latents, output_type="float32")

    pipe = flux_pipeline(bundle)
    for prompt, seed, guidance, image in zip(PROMPTS, SEEDS, GUIDANCE, images, strict=True):
        expected = pipeline_image(
            pipe,
            prompt,
            seed,
            HEIGHT,
            WIDTH,
            num_inference_steps=NUM_STEPS,
            guidance_scale=guidance,
        )
        assert max_abs(image, expected) <= TOLERANCE
    assert max_abs(images[0], images[1]) > 0.01

    # Guidance is an input of dev's transformer and nothing to schnell's.
    alone, louder = (
        denoiser.denoise([replace(requests[0], guidance_scale=guidance)])[0]
        for guidance in (GUIDANCE[0], 9.0)
    )
    assert max_abs(alone, latents[0]) <= 1e-5  # a batch of one is the same computation
    changed = max_abs(louder, alone)
    assert changed > 1e-3 if name == "flux" else changed == 0.0


def test_a_larger_image_takes_the_pipelines_larger_shift(bundles):
    # Dev's scheduler shifts with the packed token count: 64x64 px is 16 tokens, 32x48 is 6.
    bundle = bundles["flux"]
    [embedding] = PromptEncoder(bundle).encode(
        [PROMPTS[0]], max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    [latents] = Denoiser(bundle).denoise(
        [
            DenoiseRequest(
                embedding,
                seed=3,
                guidance_scale=3.5,
                height=64,
                width=64,
                num_inference_steps=NUM_STEPS,
            )
        ]
    )
    [image] = VaeDecoder(bundle).decode([latents], output_type="float32")
    expected = pipeline_image(
        flux_pipeline(bundle),
        PROMPTS[0],
        3,
        64,
        64,
        num_inference_steps=NUM_STEPS,
        guidance_scale=3.5,
    )
    assert max_abs(image, expected) <= TOLERANCE


def test_distillation_grids_are_the_pipelines_sigmas_at_each_size(bundles, tmp_path):
    bundle = bundles["flux"]
    pipe = flux_pipeline(bundle)
    with torch.no_grad():
        empty, empty_pooled, _ = pipe.encode_prompt([""], max_sequence_length=MAX_SEQUENCE_LENGTH)
    objective = LatentConsistencyDistillation(
        bundle,
        empty_prompt_embeds=empty,
        empty_pooled_prompt_embeds=empty_pooled,
        guidance_scale=3.5,
        num_teacher_steps=8,
        student_steps=NUM_STEPS,
        device=torch.device("cpu"),
    )
    for side in (32, 64):
        pipe(
            prompt=PROMPTS[0],
            height=side,
            width=side,
            num_inference_steps=NUM_STEPS,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="latent",
        )
        sigmas, edges = objective.grid((side // 8, side // 8))  # (M,), (M,)
        # Every sigma FluxPipeline steps through at this size is a phase edge of the grid.
        for sigma in pipe.scheduler.sigmas[1:]:
            assert (edges.unique() - sigma).abs().min() <= 1e-6
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    # Dev's shift grows with the image: a larger image's grid is another.
    assert not torch.equal(objective.grid((4, 4))[0], objective.grid((8, 8))[0])
    # The guidance-distilled student is told the scale it folds in; its bundle says so.
    assert objective.sampling == {"num_inference_steps": NUM_STEPS, "guidance_scale": 3.5}
    # Told the teacher's own guidance, the student (a copy of it) starts exact where the
    # teacher's step lands on a phase edge: 8 rows draw other points too.
    batch = {
        "latents": torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(0)),
        "prompt_embeds": empty.expand(8, -1, -1),
        "pooled_prompt_embeds": empty_pooled.expand(8, -1),
    }
    loss, _ = objective.loss(objective.model, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0

    # The loop draws its grids as the student will sample: told the scale it folds in.
    plan = SimpleNamespace(bundle_dir=str(bundle), family=FLUX)
    config = DistillConfig(guidance_scale=3.5)
    assert student_sampling(config, plan).sample_guidance_scale == 3.5
    chosen = DistillConfig(guidance_scale=3.5, sample_guidance_scale=2.0)
    assert student_sampling(chosen, plan).sample_guidance_scale == 2.0

    # The exported student is a Flux bundle that samples with what it records (`raygen
    # distill` runs the same objective in the Ray Train loop: tests/flows/test_distill.py).
    objective.export(objective.model.state_dict(), tmp_path / "student")
    sampling = json.loads((tmp_path / "student" / "raygen_sampling.json").read_text())
    assert sampling == {"num_inference_steps": NUM_STEPS, "guidance_scale": 3.5}
    image = pipeline_image(flux_pipeline(tmp_path / "student"), PROMPTS[0], 0, 32, 32, **sampling)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.slow
def test_prep_then_train_then_the_exported_bundle_samples_in_the_flux_pipeline(
    ray_local, bundles, tmp_path
):
    bundle = bundles["flux"]
    build_shapes_corpus(tmp_path / "shapes", count=16, size=32)
    prep = load_config(
        PrepConfig,
        values={
            "input": str(tmp_path / "shapes" / "train"),
            "output": str(tmp_path / "shards"),
            "bundle.uri": str(bundle),
            "buckets.resolution": 32,
            "encode.max_sequence_length": MAX_SEQUENCE_LENGTH,
        },
        overrides=["video_bundle=null", "caption.model=null", "filters.scorer=null"],
    )
    manifest = run_prep(prep)
    assert manifest.num_written == 16 and not manifest.quarantined

    # What prep stored is Flux's: T5 sequence + CLIP-L pooled, and the VAE's latent mean.
    shard = next((tmp_path / "shards").rglob("*.parquet"))
    table = pq.read_table(shard).slice(0, 2)
    stored = embeddings_and_latents(table)
    pipe = flux_pipeline(bundle)
    captions = [str(c) for c in table.column("caption_original").to_pylist()]
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(
            captions, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
    assert max_abs(stored["prompt_embeds_original"], prompt_embeds) <= 1e-5
    assert max_abs(stored["pooled_prompt_embeds_original"], pooled) <= 1e-5
    assert stored["latents"].shape[1:] == (16, 4, 4)

    config = load_config(
        TrainConfig,
        values={
            "data": str(tmp_path / "shards"),
            "output": str(tmp_path / "run"),
            "bundle.uri": str(bundle),
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "batch_size": 4,
            "max_steps": 3,
            "checkpoint_every": 3,
            "caption": "original",
        },
    )
    result = run_train(config)
    assert result.steps == 3
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert losses and all(np.isfinite(losses))

    trained = flux_pipeline(Path(result.bundle))
    before = FluxTransformer2DModel.from_pretrained(bundle, subfolder="transformer")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            trained.transformer.state_dict().values(), before.state_dict().values(), strict=True
        )
    )
    image = pipeline_image(trained, PROMPTS[0], 0, 32, 32, num_inference_steps=2)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
