import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from benchmarks.train import run_distill_benchmark
from cluster.bundles import SAMPLING_FILE
from flows.distill import LatentConsistencyDistillation, run_distill
from flows.models import CAPTION_WORDS, build_tiny_bundles
from schemas.config import ConfigError, DistillConfig, load_config

CPU = torch.device("cpu")
# T5 tokens per prompt, training and evaluation alike: 6-word captions fit, and 77 + 16 text
# tokens instead of 77 + 256 make a training step about 4x cheaper.
MAX_SEQUENCE_LENGTH = 16

# Found by sweeping on this tiny teacher (teacher_4 / student_4 MSE ratio 4.5 here, 3.1 to
# 4.4 over three other seeds; the class defaults, 32 steps and decay 0.95, reach only 1.6 in
# the same 1000 updates). 16 teacher steps (skip k = 1000 / 16 timesteps) put 5 teacher
# steps in each 4-step phase with a small floor (Euler-16 against the Euler-32 reference:
# MSE 0.0002); a target EMA faster than LCM's 0.95 and a linearly decayed learning rate suit
# 1000 updates.
GUIDANCE_SCALE = 4.5
NUM_TEACHER_STEPS = 16
STUDENT_STEPS = 4
TARGET_EMA_DECAY = 0.5
LEARNING_RATE = 2e-3
# `raygen distill` updates in the >= 2x test (benchmarks/train.py runs 1000: 3.9x).
RAYGEN_STEPS = 400
BATCH_SIZE = 16
NUM_CAPTIONS = 256
NUM_LATENTS = 1024


def captions(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(CAPTION_WORDS, k=6)) for _ in range(count)]


@dataclass
class Embeddings:
    prompt_embeds: torch.Tensor  # (N, L, D)
    pooled_prompt_embeds: torch.Tensor  # (N, D)
    empty_prompt_embeds: torch.Tensor  # (1, L, D)
    empty_pooled_prompt_embeds: torch.Tensor  # (1, D)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), ["t2i"], seed=0)["t2i"]


@pytest.fixture(scope="module")
def embeddings(teacher_dir: Path) -> Embeddings:
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher_dir)
    with torch.no_grad():
        prompt_embeds, empty_embeds, pooled, empty_pooled = pipe.encode_prompt(
            captions(NUM_CAPTIONS, seed=0),
            prompt_2=None,
            prompt_3=None,
            negative_prompt="",
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    # The negative branch repeats the encoding of "" once per prompt.
    return Embeddings(prompt_embeds, pooled, empty_embeds[:1], empty_pooled[:1])


def make_objective(teacher_dir: Path, embeddings: Embeddings) -> LatentConsistencyDistillation:
    return LatentConsistencyDistillation(
        teacher_dir,
        empty_prompt_embeds=embeddings.empty_prompt_embeds,
        empty_pooled_prompt_embeds=embeddings.empty_pooled_prompt_embeds,
        guidance_scale=GUIDANCE_SCALE,
        num_teacher_steps=NUM_TEACHER_STEPS,
        student_steps=STUDENT_STEPS,
        target_ema_decay=TARGET_EMA_DECAY,
        device=CPU,
    )


def train(
    objective: LatentConsistencyDistillation, embeddings: Embeddings, num_steps: int
) -> list[dict[str, float]]:
    """A plain single-process loop, the calls the Ray Train loop makes, in the same order."""
    generator = torch.Generator().manual_seed(0)
    # Latents shaped and scaled like SD3 training data (unit variance after scaling).
    latents = torch.randn(NUM_LATENTS, 16, 4, 4, generator=generator)  # (N, 16, 4, 4)
    caption_index = torch.randint(NUM_CAPTIONS, (NUM_LATENTS,), generator=generator)  # (N,)
    optimizer = torch.optim.AdamW(objective.model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / num_steps)
    history = []
    for _ in range(num_steps):
        rows = torch.randint(NUM_LATENTS, (BATCH_SIZE,), generator=generator)  # (B,)
        batch = {
            "latents": latents[rows],
            "prompt_embeds": embeddings.prompt_embeds[caption_index[rows]],
            "pooled_prompt_embeds": embeddings.pooled_prompt_embeds[caption_index[rows]],
        }
        loss, metrics = objective.loss(objective.model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        objective.after_optimizer_step(objective.model)
        history.append(metrics)
    return history


@pytest.fixture(scope="module")
def distilled_by_raygen(
    ray_local, teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """`raygen distill` (run_distill: Ray Train, one worker) of the tiny teacher on shards of
    its own encodings, and the held-out distances: what benchmarks/train.py reports."""
    work = tmp_path_factory.mktemp("distill")
    return run_distill_benchmark(work, teacher_dir, RAYGEN_STEPS, sample_every=RAYGEN_STEPS)


@pytest.mark.slow
def test_raygen_distill_student_at_4_steps_is_twice_as_close_to_the_teacher_ode(
    distilled_by_raygen: dict,
) -> None:
    # Prompts and noise the student never saw (captions seeded apart from training's).
    distances = distilled_by_raygen["mse"]
    print(f"MSE to the teacher's 32-step samples after {RAYGEN_STEPS} updates: {distances}")
    assert set(distances) == {"student_1", "student_2", "student_4", "teacher_4"}
    assert distances["student_4"] * 2 <= distances["teacher_4"], distances
    # The bundle it judged (sampled in plain diffusers) is the one run_distill exported, with
    # its few-step sampling settings, beside the run's metrics and sample grid.
    bundle = Path(distilled_by_raygen["bundle"])
    sampling = json.loads((bundle / SAMPLING_FILE).read_text())
    assert sampling == {"num_inference_steps": STUDENT_STEPS, "guidance_scale": 1.0}
    records = [json.loads(line) for line in (bundle.parent / "metrics.jsonl").open()]
    assert records[-1]["step"] == RAYGEN_STEPS and all(np.isfinite(r["loss"]) for r in records)
    assert (bundle.parent / "samples" / f"step-{RAYGEN_STEPS:07d}.png").exists()


@pytest.fixture(scope="module")
def distilled(
    teacher_dir: Path, embeddings: Embeddings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LatentConsistencyDistillation, Path]:
    """A few in-process updates, then the export: what the export test compares with."""
    objective = make_objective(teacher_dir, embeddings)
    train(objective, embeddings, num_steps=3)
    student_dir = tmp_path_factory.mktemp("student") / "bundle"
    objective.export(objective.model.state_dict(), student_dir)
    return objective, student_dir


@pytest.mark.slow
def test_export_is_a_bundle_that_samples_in_few_steps(
    teacher_dir: Path, distilled: tuple[LatentConsistencyDistillation, Path]
) -> None:
    objective, student_dir = distilled
    sampling = json.loads((student_dir / SAMPLING_FILE).read_text())
    assert sampling == {"num_inference_steps": STUDENT_STEPS, "guidance_scale": 1.0}

    # Every folder but transformer/ and scheduler/ is the teacher's, byte for byte.
    for path in teacher_dir.rglob("*"):
        if path.is_file() and path.relative_to(teacher_dir).parts[0] not in (
            "transformer",
            "scheduler",
        ):
            copy = student_dir / path.relative_to(teacher_dir)
            assert copy.read_bytes() == path.read_bytes()
    weights = load_file(student_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, value in objective.model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0)

    pipe = StableDiffusion3Pipeline.from_pretrained(student_dir)
    pipe.set_progress_bar_config(disable=True)
    scheduler = pipe.scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    assert not scheduler.config.stochastic_sampling
    teacher_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        teacher_dir, subfolder="scheduler"
    )
    assert scheduler.config.shift == teacher_scheduler.config.shift
    # The sigmas the bundle samples at: 1.0, then the phase edges the student was trained for.
    scheduler.set_timesteps(sampling["num_inference_steps"])
    sigmas, edges = objective.grid((4, 4))  # (M,), (M,): the 32 px training latents
    assert scheduler.sigmas[0] == sigmas[0] == 1.0
    edges = edges.unique()  # (student_steps,)
    assert len(edges) == STUDENT_STEPS
    for sigma in scheduler.sigmas[1:]:
        assert (edges - sigma).abs().min() <= 1e-6

    image = pipe(
        "a red fox in the snow",
        **sampling,
        height=32,
        width=32,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3)
    assert np.isfinite(image).all()


def test_state_dict_round_trip_gives_identical_loss(
    teacher_dir: Path, embeddings: Embeddings
) -> None:
    objective = make_objective(teacher_dir, embeddings)
    train(objective, embeddings, num_steps=3)
    # What a checkpoint holds: the student's weights and the objective's own state.
    buffer = io.BytesIO()
    torch.save({"model": objective.model.state_dict(), "objective": objective.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    resumed = make_objective(teacher_dir, embeddings)
    resumed.model.load_state_dict(checkpoint["model"])
    without_target_state = make_objective(teacher_dir, embeddings)
    without_target_state.model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["objective"])

    batch = {
        "latents": torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(1)),
        "prompt_embeds": embeddings.prompt_embeds[:4],
        "pooled_prompt_embeds": embeddings.pooled_prompt_embeds[:4],
    }

    def loss(objective: LatentConsistencyDistillation) -> torch.Tensor:
        return objective.loss(objective.model, batch, torch.Generator().manual_seed(2))[0]

    assert torch.equal(loss(resumed), loss(objective))
    # The target network is state of its own: without it the loss differs.
    assert not torch.equal(loss(without_target_state), loss(objective))


def test_grid_holds_the_student_sigmas_as_phase_edges(
    teacher_dir: Path, embeddings: Embeddings
) -> None:
    objective = make_objective(teacher_dir, embeddings)
    sigmas, edges = objective.grid((4, 4))  # (M,), (M,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[:-1] > sigmas[1:]).all()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(teacher_dir, subfolder="scheduler")
    scheduler.set_timesteps(STUDENT_STEPS)
    # Every student sigma is a grid point and the edge of the points just above it.
    for sigma in scheduler.sigmas[1:]:
        position = int((sigmas - sigma).abs().argmin())
        assert (sigmas[position] - sigma).abs() <= 1e-6
        assert edges[position - 1] == sigmas[position]
    # A phase's edge lies below every point of the phase and at or below the next point.
    assert (edges[:-1] < sigmas[:-1]).all() and (edges[:-1] <= sigmas[1:]).all()


def test_rejects_fewer_teacher_steps_than_student_steps(teacher_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_teacher_steps"):
        LatentConsistencyDistillation(
            teacher_dir,
            empty_prompt_embeds=torch.zeros(1, 93, 96),
            empty_pooled_prompt_embeds=torch.zeros(1, 80),
            num_teacher_steps=2,
            student_steps=4,
            device=CPU,
        )


# --- `raygen distill` on the shared Ray Train loop, on shards `raygen prep` made ---


def _distill_config(tiny_bundles, prep_shards, output, **values) -> DistillConfig:
    defaults = {
        "teacher.uri": str(tiny_bundles["t2i"]),
        "data": str(prep_shards),
        "output": str(output),
        "num_workers": 2,
        "batch_size": 4,
        "max_steps": 2,
        "checkpoint_every": 2,
    }
    return load_config(DistillConfig, values={**defaults, **values})


@pytest.mark.slow
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"parallelism": "fsdp"}, "^parallelism: distillation runs with ddp"),
        ({"num_teacher_steps": 2}, "^num_teacher_steps: 2 is below student_steps 4"),
        ({"teacher.uri": "t2v", "batch_size": 2}, "^teacher: .* is a WanTransformer3DModel"),
    ],
)
def test_distill_config_mistakes_fail_before_workers_start(
    tiny_bundles, prep_shards, tmp_path, values, message
):
    if values.get("teacher.uri") == "t2v":
        values = {**values, "teacher.uri": str(tiny_bundles["t2v"])}
    with pytest.raises(ConfigError, match=message):
        run_distill(_distill_config(tiny_bundles, prep_shards, tmp_path / "run", **values))
