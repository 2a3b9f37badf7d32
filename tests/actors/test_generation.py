"""Generation stages against diffusers' own pipelines: the staged text encoders -> denoiser ->
VAE decode give the monolithic StableDiffusion3Pipeline's image (alone and batched), a base ->
refiner handoff gives diffusers' interrupted-and-continued pipelines' image, the x4 stage gives
StableDiffusionUpscalePipeline's; plus the embedding cache and the batch contract."""

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionUpscalePipeline
from PIL import Image

from actors.generation import (
    Denoiser,
    DenoiseRequest,
    PromptEmbeddings,
    PromptEncoder,
    Upscaler,
    VaeDecoder,
)
from flows.models import build_tiny_bundles, build_tiny_lora
from schemas.errors import AdapterError

HEIGHT, WIDTH = 32, 48  # not square, so height and width cannot be swapped unnoticed
NUM_STEPS = 6
MAX_SEQUENCE_LENGTH = 16
DENOISING_END = 0.8  # the API's default handoff
TOLERANCE = 1e-4  # max abs difference of float32 pixels in [0, 1]


@dataclass(frozen=True)
class Case:
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance_scale: float


CASES = (
    Case("a red cat sitting on a chair", None, 0, 7.0),
    Case("two dogs running on the beach at sunset", "blurry dark photo", 1, 3.5),
    # At guidance_scale <= 1 the pipeline runs no unconditional pass at all: 0 gives the
    # conditional prediction, not the negative prompt's.
    Case("a small house near a lake", None, 2, 0.0),
)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(
        tmp_path_factory.mktemp("bundles"), names=["t2i", "refiner", "upscaler"]
    )


@pytest.fixture(scope="module")
def encoder(bundles: dict[str, Path]) -> PromptEncoder:
    return PromptEncoder(bundles["t2i"])


@pytest.fixture(scope="module")
def base(bundles: dict[str, Path]) -> Denoiser:
    return Denoiser(bundles["t2i"])


@pytest.fixture(scope="module")
def refiner(bundles: dict[str, Path]) -> Denoiser:
    return Denoiser(bundles["refiner"])


@pytest.fixture(scope="module")
def decoder(bundles: dict[str, Path]) -> VaeDecoder:
    return VaeDecoder(bundles["t2i"])


def sd3_pipeline(bundle_dir: Path) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(bundle_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call(pipe: StableDiffusion3Pipeline, case: Case, **kwargs) -> np.ndarray:
    return pipe(
        prompt=case.prompt,
        negative_prompt=case.negative_prompt,
        num_inference_steps=NUM_STEPS,
        guidance_scale=case.guidance_scale,
        height=HEIGHT,
        width=WIDTH,
        generator=torch.Generator().manual_seed(case.seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        **kwargs,
    ).images


def request(embeddings: PromptEmbeddings, case: Case, **kwargs) -> DenoiseRequest:
    return DenoiseRequest(
        embeddings=embeddings,
        seed=case.seed,
        guidance_scale=case.guidance_scale,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=NUM_STEPS,
        **kwargs,
    )


def embed(encoder: PromptEncoder, cases: tuple[Case, ...]) -> list[PromptEmbeddings]:
    return encoder.encode(
        [case.prompt for case in cases],
        [case.negative_prompt for case in cases],
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )


def max_abs(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_staged_batch_equals_one_pipeline_call_per_prompt(bundles, encoder, base, decoder):
    embeddings = embed(encoder, CASES)
    progress: list[tuple[list[int], list[int]]] = []
    latents = base.denoise(
        [request(e, case) for e, case in zip(embeddings, CASES, strict=True)],
        callback_on_step_end=lambda done, num_steps: progress.append((done, num_steps)),
    )
    # SD3's 16 latent channels at 1/8 of the image size.
    assert [tuple(sample.shape) for sample in latents] == [(16, HEIGHT // 8, WIDTH // 8)] * 3
    images = decoder.decode(latents, output_type="float32")

    pipe = sd3_pipeline(bundles["t2i"])
    for case, image in zip(CASES, images, strict=True):
        assert image.shape == (HEIGHT, WIDTH, 3)
        assert max_abs(image, pipeline_call(pipe, case, output_type="np")[0]) <= TOLERANCE
    # Distinct images: each request got its own prompt, seed and guidance.
    assert max_abs(images[0], images[1]) > 0.01 and max_abs(images[1], images[2]) > 0.01
    assert progress == [([step] * 3, [NUM_STEPS] * 3) for step in range(1, NUM_STEPS + 1)]

    # A batch of one is the same computation.
    [alone] = base.denoise([request(embeddings[1], CASES[1])])
    assert max_abs(alone, latents[1]) <= 1e-5


def test_uint8_images_quantize_the_float_ones(encoder, base, decoder):
    latents = base.denoise([request(e, CASES[0]) for e in embed(encoder, CASES[:1])])
    [image] = decoder.decode(latents)
    [pixels] = decoder.decode(latents, output_type="float32")
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(image, (pixels * 255).round().astype(np.uint8))


def test_base_then_refiner_equals_the_interrupted_and_continued_pipelines(
    bundles, encoder, base, refiner, decoder
):
    case = CASES[1]
    [embeddings] = embed(encoder, (case,))
    [handed] = base.denoise([request(embeddings, case, denoising_end=DENOISING_END)])
    [refined] = refiner.denoise(
        [request(embeddings, case, denoising_start=DENOISING_END, latents=handed)]
    )
    [image] = decoder.decode([refined], output_type="float32")

    # The reference is diffusers' own pipelines and scheduler. The handoff step is SDXL's
    # (pipeline_stable_diffusion_xl's denoising_end cutoff).
    base_pipe, refiner_pipe = sd3_pipeline(bundles["t2i"]), sd3_pipeline(bundles["refiner"])
    scheduler = base_pipe.scheduler
    scheduler.set_timesteps(NUM_STEPS)
    num_train_timesteps = scheduler.config.num_train_timesteps
    cutoff = int(round(num_train_timesteps - DENOISING_END * num_train_timesteps))
    handoff = int((scheduler.timesteps >= cutoff).sum())
    assert 0 < handoff < NUM_STEPS  # both models run
    base_sigmas = scheduler.sigmas.clone()  # (NUM_STEPS + 1,), ending in the terminal 0

    # Base: SD3's loop, interrupted after the handoff step, returning its latents.
    def stop_at_handoff(pipe, step, timestep, callback_kwargs):
        if step + 1 == handoff:
            pipe._interrupt = True
        return callback_kwargs

    base_latents = pipeline_call(
        base_pipe, case, callback_on_step_end=stop_at_handoff, output_type="latent"
    )  # (1, C, h, w)
    assert max_abs(handed, base_latents[0]) <= 1e-5

    # Refiner: SD3's loop from those latents over the rest of the schedule. set_timesteps
    # shifts the sigmas it is given and appends the terminal 0 itself, so it gets the unshifted
    # sigmas of the remaining steps (the linspace its own set_timesteps shifts).
    unshifted = np.linspace(scheduler.sigma_max, scheduler.sigma_min, NUM_STEPS)[handoff:]
    reference = pipeline_call(
        refiner_pipe, case, latents=base_latents, sigmas=unshifted.tolist(), output_type="np"
    )[0]
    # The refiner pipeline stepped exactly through the base schedule's tail.
    torch.testing.assert_close(refiner_pipe.scheduler.sigmas, base_sigmas[handoff:])
    assert max_abs(image, reference) <= TOLERANCE
    # The refiner's weights mattered: the base alone gives another image.
    base_only = pipeline_call(base_pipe, case, output_type="np")[0]
    assert max_abs(image, base_only) > 0.01


def test_a_resolution_dependent_shift_follows_the_pipeline(bundles, encoder, tmp_path):
    # A copy of the base bundle whose scheduler shifts by image size (use_dynamic_shifting).
    bundle = tmp_path / "t2i-dynamic"
    shutil.copytree(bundles["t2i"], bundle)
    config_path = bundle / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dynamic_shifting": True}))

    case = CASES[0]
    [embeddings] = embed(encoder, (case,))
    [latents] = Denoiser(bundle).denoise([request(embeddings, case)])
    reference = pipeline_call(sd3_pipeline(bundle), case, output_type="latent")[0]
    assert max_abs(latents, reference) <= 1e-5
    [fixed_shift] = Denoiser(bundles["t2i"]).denoise([request(embeddings, case)])
    assert max_abs(latents, fixed_shift) > 1e-3


def test_requests_with_different_handoffs_share_a_call(encoder, base):
    embeddings = embed(encoder, CASES)
    [handed] = base.denoise([request(embeddings[2], CASES[2], denoising_end=DENOISING_END)])
    requests = [
        request(embeddings[0], CASES[0]),  # the whole schedule
        request(embeddings[1], CASES[1], denoising_end=DENOISING_END),  # its head
        request(embeddings[2], CASES[2], denoising_start=DENOISING_END, latents=handed),  # tail
    ]
    progress: list[tuple[list[int], list[int]]] = []
    together = base.denoise(
        requests, callback_on_step_end=lambda done, num_steps: progress.append((done, num_steps))
    )
    for one, latents in zip(requests, together, strict=True):
        [alone] = base.denoise([one])
        assert max_abs(latents, alone) <= 1e-5
    # Each request's progress counts the steps of its own span: the head's stop at the
    # handoff, the tail's start there.
    handoff = progress[0][1][1]
    assert 0 < handoff < NUM_STEPS
    assert [num_steps for _, num_steps in progress] == [
        [NUM_STEPS, handoff, NUM_STEPS - handoff]
    ] * NUM_STEPS
    assert [done for done, _ in progress] == [
        [step, min(step, handoff), max(step - handoff, 0)] for step in range(1, NUM_STEPS + 1)
    ]


def test_the_step_callback_stops_a_call_as_diffusers_interrupt_does(bundles, encoder, base):
    case = CASES[1]
    [embeddings] = embed(encoder, (case,))
    calls: list[list[int]] = []

    def stop_after_two(done: list[int], num_steps: list[int]) -> bool:
        calls.append(done)
        return done == [2]

    [stopped] = base.denoise([request(embeddings, case)], callback_on_step_end=stop_after_two)
    assert calls == [[1], [2]]

    def interrupt_after_two(pipe, step, timestep, callback_kwargs):
        if step + 1 == 2:
            pipe._interrupt = True
        return callback_kwargs

    reference = pipeline_call(
        sd3_pipeline(bundles["t2i"]),
        case,
        callback_on_step_end=interrupt_after_two,
        output_type="latent",
    )[0]
    assert max_abs(stopped, reference) <= 1e-5


def test_a_batch_must_share_its_key(encoder, base):
    [embeddings] = embed(encoder, CASES[:1])
    [longer] = encoder.encode([CASES[0].prompt], max_sequence_length=MAX_SEQUENCE_LENGTH + 1)
    one = request(embeddings, CASES[0])
    for other in (
        replace(one, height=HEIGHT * 2),
        replace(one, num_inference_steps=NUM_STEPS + 1),
        replace(one, embeddings=longer),
    ):
        with pytest.raises(ValueError, match="must share"):
            base.denoise([one, other])
    with pytest.raises(ValueError, match="multiples of"):
        base.denoise([replace(one, height=HEIGHT + 8)])
    with pytest.raises(ValueError, match="give both or neither"):
        replace(one, denoising_start=DENOISING_END)
    with pytest.raises(ValueError, match="must be in"):
        replace(one, denoising_end=1.0)


def test_adapters_are_the_pipelines_load_lora_weights_and_set_adapters(
    bundles, encoder, decoder, tmp_path
):
    lora_a = build_tiny_lora(bundles["t2i"], tmp_path / "a", seed=1)
    lora_b = build_tiny_lora(bundles["t2i"], tmp_path / "b", seed=2)
    denoiser = Denoiser(bundles["t2i"])  # its own: adapters change what it holds
    denoiser.hold_adapters({"a": lora_a, "b": lora_b})
    assert denoiser.adapters == ["a", "b"]
    pipe = sd3_pipeline(bundles["t2i"])
    pipe.load_lora_weights(lora_a, adapter_name="a")
    pipe.load_lora_weights(lora_b, adapter_name="b")

    case = CASES[1]
    [embeddings] = embed(encoder, (case,))

    def staged(adapters: tuple[tuple[str, float], ...]) -> np.ndarray:
        [latents] = denoiser.denoise([request(embeddings, case, adapters=adapters)])
        return decoder.decode([latents], output_type="float32")[0]

    images = {}
    for adapters in ((("a", 1.0),), (("b", 0.6),), (("a", 0.8), ("b", 0.5)), ()):
        images[adapters] = staged(adapters)
        if adapters:
            pipe.enable_lora()
            pipe.set_adapters([name for name, _ in adapters], [scale for _, scale in adapters])
        else:
            pipe.disable_lora()
        reference = pipeline_call(pipe, case, output_type="np")[0]
        assert max_abs(images[adapters], reference) <= TOLERANCE, adapters
    plain = images[()]
    assert max_abs(images[(("a", 1.0),)], plain) > 0.01  # the adapter mattered
    assert max_abs(images[(("a", 1.0),)], images[(("b", 0.6),)]) > 0.01

    # Let go, an adapter is deleted; a call that still names it (its request waited while
    # the replica let it go) loads it back for itself only.
    denoiser.release_adapters(["a"])
    assert denoiser.adapters == ["b"]
    assert max_abs(staged((("a", 1.0),)), images[(("a", 1.0),)]) <= 1e-6
    assert denoiser.adapters == ["b"]

    # An adapter made for another transformer is refused by name; nothing of it stays.
    other = build_tiny_lora(bundles["t2i"], tmp_path / "other", seed=3, heads=3)
    with pytest.raises(AdapterError, match=r"adapter 'other': does not fit this base's transformer \(size mismatch"):
        denoiser.hold_adapters({"other": other})
    assert denoiser.adapters == ["b"]
    with pytest.raises(AdapterError, match="adapter 'c': not held"):
        staged((("c", 1.0),))


def test_a_repeated_prompt_skips_the_encoders(bundles):
    encoder = PromptEncoder(bundles["t2i"], cache_size=3)
    calls: list[str] = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(encoder.pipe, name).register_forward_hook(
            lambda module, args, output, name=name: calls.append(name)
        )

    def encode(prompt: str, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> PromptEmbeddings:
        [embeddings] = encoder.encode([prompt], [None], max_sequence_length)
        return embeddings

    first = encode("a red cat")
    # One batched run of each encoder for the prompt and the empty negative prompt.
    assert sorted(calls) == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert (encoder.hits, encoder.misses) == (0, 2)

    calls.clear()
    again = encode("a red cat")
    assert calls == []
    assert (encoder.hits, encoder.misses) == (2, 2)
    assert torch.equal(again.prompt_embeds, first.prompt_embeds)
    assert torch.equal(again.negative_pooled_prompt_embeds, first.negative_pooled_prompt_embeds)

    # Another sequence length is another entry; the cache of 3 drops the least recent.
    longer = encode("a red cat", MAX_SEQUENCE_LENGTH + 8)
    assert longer.prompt_embeds.shape[0] == first.prompt_embeds.shape[0] + 8
    assert (encoder.hits, encoder.misses) == (2, 4)
    calls.clear()
    encode("a red cat")  # evicted; its empty negative prompt was used more recently
    assert (encoder.hits, encoder.misses) == (3, 5)
    assert sorted(calls) == ["text_encoder", "text_encoder_2", "text_encoder_3"]


def test_the_embeddings_are_the_pipelines(bundles, encoder):
    pipe = sd3_pipeline(bundles["t2i"])
    case = CASES[1]
    [embeddings] = embed(encoder, (case,))
    with torch.no_grad():
        expected = pipe.encode_prompt(
            case.prompt,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=case.negative_prompt,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )  # (prompt, negative, pooled, negative pooled), each with a batch of 1
    got = (
        embeddings.prompt_embeds,
        embeddings.negative_prompt_embeds,
        embeddings.pooled_prompt_embeds,
        embeddings.negative_pooled_prompt_embeds,
    )
    for tensor, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(tensor, reference[0])


def test_upscaler_is_the_x4_pipeline(bundles):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(2)]
    prompts, seeds = ["a red cat", "a green field"], [3, 4]
    settings = {"noise_level": 20, "num_inference_steps": 3, "guidance_scale": 5.0}
    upscaler = Upscaler(bundles["upscaler"])
    upscaled = upscaler.upscale(images, prompts, seeds, **settings, output_type="float32")

    pipe = StableDiffusionUpscalePipeline.from_pretrained(bundles["upscaler"])
    pipe.set_progress_bar_config(disable=True)
    for image, prompt, seed, big in zip(images, prompts, seeds, upscaled, strict=True):
        assert big.shape == (16 * 4, 24 * 4, 3)
        reference = pipe(
            prompt=prompt,
            image=Image.fromarray(image),
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **settings,
        ).images[0]
        assert max_abs(big, reference) <= TOLERANCE

    # Deterministic for a seed; the seed and the noise level both change the result.
    uint8 = upscaler.upscale(images[:1], prompts[:1], seeds[:1], **settings)
    assert uint8[0].dtype == np.uint8
    np.testing.assert_array_equal(
        uint8[0], upscaler.upscale(images[:1], prompts[:1], seeds[:1], **settings)[0]
    )
    other_seed = upscaler.upscale(images[:1], prompts[:1], [5], **settings, output_type="float32")
    assert max_abs(other_seed[0], upscaled[0]) > 1e-3
    noisier = upscaler.upscale(
        images[:1],
        prompts[:1],
        seeds[:1],
        **{**settings, "noise_level": 200},
        output_type="float32",
    )
    assert max_abs(noisier[0], upscaled[0]) > 1e-3
    with pytest.raises(ValueError, match="must share a size"):
        upscaler.upscale([images[0], images[0][:8]], prompts, seeds, **settings)
