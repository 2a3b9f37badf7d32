"""Few-step distillation of a rectified-flow teacher (SD3, Flux) into a consistency student.

`LatentConsistencyDistillation` is the objective the Ray Train loop drives: it holds the frozen
teacher and the EMA target network, computes the loss for one batch of latents and text
embeddings, and exports the student as a complete diffusers bundle. `distance_to_teacher`
measures how closely a few-step student follows its teacher's many-step ODE solution.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from actors.families import Family, component_config, family_of
from cluster.bundles import SAMPLING_FILE
from flows.train import RunPlan, RunResult, plan_shards, run_loop
from schemas.config import ConfigError, DistillConfig


class LatentConsistencyDistillation:
    """Latent consistency distillation (LCD) of a flow-matching teacher, phased at the
    student's sampling sigmas, with classifier-free guidance folded into the student.

    Method: LCD from Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution
    Images with Few-Step Inference", arXiv:2310.04378 (Algorithm 1: skip-step teacher ODE
    solver with CFG, EMA target network), adapted to rectified flow (SD3). Guidance is a fixed
    scale with no w-embedding, as LCM-LoRA (arXiv:2311.05556) does, so the student samples with
    guidance 1. The consistency boundary sits at every sampling sigma of the student instead of
    only at 0, as in Multistep Consistency Models (Heek et al. 2024, arXiv:2403.06807) and
    Phased Consistency Models (Wang et al. 2024, arXiv:2405.18407); with `student_steps=1` this
    is exactly LCD. Why: the student is sampled deterministically (the Euler scheduler), and
    re-noising a perfect x0 estimate with the implied noise lands off the teacher's curved ODE
    trajectory, so multistep samples of a perfect LCD student drift from the teacher's (on the
    tiny SD3 at w=4.5, 4 steps: MSE 0.0021 against the 32-step sample, teacher 4 steps 0.0032).
    Phases make the Euler sampler follow the trajectory exactly where the student is perfect.

    Rectified flow: x_sigma = (1 - sigma) * x0 + sigma * noise and the transformer predicts
    v = noise - x0. In the phase (e_next, e] between consecutive student sigmas the consistency
    function is the Euler jump to the phase's lower edge,
        f(x, sigma) = x + (e_next - sigma) * v(x, sigma),
    which meets the boundary condition f(x, e_next) = x by construction; for the last phase
    (e_next = 0) it is the x0 estimate x - sigma * v, plain LCD's consistency function.

    One loss evaluation:
      1. pick adjacent grid points sigma_i > sigma_{i+1} (below) and sigma_i's lower edge e,
      2. x_i = (1 - sigma_i) * x0 + sigma_i * noise,
      3. the teacher takes one Euler ODE step with guidance w to sigma_{i+1}: x_hat,
      4. loss = MSE(f_student(x_i, sigma_i), f_target(x_hat, sigma_{i+1})), the target network
         (an EMA of the student, decay `target_ema_decay`) under no grad.

    Skip-step grid: the teacher scheduler's own `num_teacher_steps` sigmas (the bundle's
    shift), so one grid interval is LCM's skip k = num_train_timesteps / num_teacher_steps,
    merged with the `student_steps` sigmas the exported scheduler samples at: those are the
    phase edges, and a 32-step grid does not contain the 4-step sigmas (both are spaced
    uniformly in unshifted time, 31 intervals against 3).

    Sampling: FlowMatchEulerDiscreteScheduler at `student_steps`, deterministic. Its step from
    edge e to e_next, x + (e_next - e) * v(x, e), is f(x, e): one step per phase. Both grids
    are the sigmas the family's pipeline samples (its ``timestep_kwargs``): where those depend
    on the image size (Flux dev's dynamic shift), each latent size gets its own grid, and the
    student is exact at the sizes it was distilled on.

    Families: the teacher's guidance is the family's. SD3's is classifier-free (the formula
    above); a guidance-distilled teacher (Flux dev) is told w in one pass, and the student is
    told the same w (what it folds in), which its bundle records as its guidance_scale.

    The student and target are float32 (optimizer master weights; an EMA with decay 0.95
    would round updates away in bf16). `dtype` applies to the frozen teacher only.
    """

    output_name = "bundle"

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        empty_prompt_embeds: Tensor,
        empty_pooled_prompt_embeds: Tensor,
        guidance_scale: float = 4.5,
        num_teacher_steps: int = 32,
        student_steps: int = 4,
        target_ema_decay: float = 0.95,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_teacher_steps < student_steps:
            raise ValueError(
                f"num_teacher_steps ({num_teacher_steps}) must be at least student_steps "
                f"({student_steps}): the student learns to jump over teacher steps"
            )
        if not 0.0 <= target_ema_decay < 1.0:
            raise ValueError(f"target_ema_decay must be in [0, 1), got {target_ema_decay}")
        self.bundle_dir = Path(bundle_dir)
        self.guidance_scale = guidance_scale
        self.num_teacher_steps = num_teacher_steps
        self.student_steps = student_steps
        self.target_ema_decay = target_ema_decay
        self.device = device

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            self.bundle_dir, subfolder="scheduler"
        )
        self.family = family_of(self.bundle_dir, media="image")
        self.transformer_class = self.family.denoiser_class(self.bundle_dir)
        self.teacher = self.transformer_class.from_pretrained(
            self.bundle_dir, subfolder="transformer", dtype=dtype
        ).to(device)
        self.teacher.requires_grad_(False).eval()
        self.guidance = self.family.guidance(self.teacher.config)
        # (h, w) of the latents -> (sigmas (M,), edges (M,)): the skip-step grid at that size.
        self._grids: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        student = self.transformer_class.from_pretrained(self.bundle_dir, subfolder="transformer")
        self.target = copy.deepcopy(student).to(device)
        self.target.requires_grad_(False).eval()
        self.model: torch.nn.Module = student.to(device).train()

        # (1, L, D) and (1, D): the teacher's unconditional branch, as the pipeline encodes "".
        self.empty_prompt_embeds = empty_prompt_embeds.to(device)
        self.empty_pooled_prompt_embeds = empty_pooled_prompt_embeds.to(device)

    def loss(
        self, model: torch.nn.Module, batch: dict[str, Tensor], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        latents = batch["latents"]  # (B, C, h, w)
        prompt_embeds = batch["prompt_embeds"]  # (B, L, D)
        pooled = batch["pooled_prompt_embeds"]  # (B, D)
        batch_size = latents.shape[0]

        sigmas, edges = self.grid(tuple(latents.shape[-2:]))  # (M,), (M,)
        # Grid index i of the noisier point; len(sigmas) - 1 points have a successor.
        index = torch.randint(
            len(sigmas) - 1, (batch_size,), generator=generator, device=generator.device
        ).to(self.device)  # (B,)
        sigma = sigmas[index].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        sigma_next = sigmas[index + 1].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        edge = edges[index].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noise = randn_tensor(
            latents.shape, generator=generator, device=self.device, dtype=latents.dtype
        )  # (B, C, h, w)
        noisy = (1.0 - sigma) * latents + sigma * noise  # (B, C, h, w)
        # What the student (and its target) are told of guidance: the scale they fold in, for
        # a transformer that takes one (Flux dev); nothing otherwise.
        told = self._told(batch_size, self.guidance_scale)

        with torch.no_grad():
            v_teacher = self._teacher_velocity(noisy, sigma, prompt_embeds, pooled)
            teacher_next = noisy + (sigma_next - sigma) * v_teacher  # (B, C, h, w)

            # Where sigma_next is the edge this is teacher_next itself: the boundary condition.
            v_target = self.family.predict(
                self.target, teacher_next, self._timestep(sigma_next), prompt_embeds, pooled, told
            )  # (B, C, h, w)
            target = teacher_next + (edge - sigma_next) * v_target  # (B, C, h, w)

        # Called through `model` (possibly DDP/FSDP-wrapped) so gradients are synchronized.
        v_student = self.family.predict(
            model, noisy, self._timestep(sigma), prompt_embeds, pooled, told
        )  # (B, C, h, w)
        prediction = noisy + (edge - sigma) * v_student.float()  # (B, C, h, w)

        # MSE rather than LCM's pseudo-Huber: MSE is the distance the student is judged by
        # (`distance_to_teacher`), and with LCM's c = 0.001 pseudo-Huber is about L1 here.
        loss = F.mse_loss(prediction, target)
        metrics = {"loss": loss.item(), "sigma": sigma.mean().item()}
        return loss, metrics

    def _teacher_velocity(
        self, noisy: Tensor, sigma: Tensor, prompt_embeds: Tensor, pooled: Tensor
    ) -> Tensor:
        """The teacher's guided velocity (B, C, h, w), float32: classifier-free guidance with
        the pipeline's batching, or one pass told the scale (guidance-distilled teachers)."""
        dtype = self.teacher.dtype
        timestep = self._timestep(sigma)  # (B,)
        if self.guidance != "cfg":
            told = self._told(len(noisy), self.guidance_scale)
            v = self.family.predict(
                self.teacher,
                noisy.to(dtype),
                timestep,
                prompt_embeds.to(dtype),
                pooled.to(dtype),
                told,
            )
            return v.float()
        v_both = self.family.predict(
            self.teacher,
            torch.cat([noisy, noisy]).to(dtype),
            timestep.repeat(2),
            torch.cat([self.empty_prompt_embeds.expand_as(prompt_embeds), prompt_embeds]).to(dtype),
            torch.cat([self.empty_pooled_prompt_embeds.expand_as(pooled), pooled]).to(dtype),
        )  # (2B, C, h, w)
        v_uncond, v_cond = v_both.float().chunk(2)  # (B, C, h, w) each
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    def _told(self, batch_size: int, scale: float) -> Tensor | None:
        """(B,) guidance input of a guidance-embedding transformer; None for the others."""
        if self.guidance != "embedded":
            return None
        return torch.full((batch_size,), scale, dtype=torch.float32, device=self.device)

    def grid(self, latent_size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """The skip-step grid for latents of ``latent_size`` (h, w): (sigmas (M,), edges (M,))."""
        if latent_size not in self._grids:
            sigmas, edges = _skip_step_grid(
                self.scheduler,
                self.family,
                self.teacher.config,
                latent_size,
                self.num_teacher_steps,
                self.student_steps,
            )
            self._grids[latent_size] = sigmas.to(self.device), edges.to(self.device)
        return self._grids[latent_size]

    @property
    def sampling(self) -> dict[str, float | int]:
        """How the student samples: its steps, and guidance 1 (folded in) or, for a
        guidance-embedding transformer, the scale it was told."""
        guidance = self.guidance_scale if self.guidance == "embedded" else 1.0
        return {"num_inference_steps": self.student_steps, "guidance_scale": guidance}

    @torch.no_grad()
    def after_optimizer_step(self, model_unwrapped: torch.nn.Module) -> None:
        """Move the target network towards the student: target = d * target + (1 - d) * student."""
        target_params = list(self.target.parameters())
        student_params = [param.detach() for param in model_unwrapped.parameters()]
        torch._foreach_lerp_(target_params, student_params, 1.0 - self.target_ema_decay)

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    def export(self, student_state_dict: dict[str, Tensor], out_dir: str | Path) -> None:
        """Write the student as a complete diffusers bundle to `out_dir`.

        Every folder of the teacher bundle is copied unchanged but transformer/ (the student)
        and scheduler/ (deterministic Euler with the teacher's shift, the sampler the student
        was trained for). The bundle is staged next to `out_dir` and renamed into place, so a
        reader never sees a half-written bundle; an existing `out_dir` is replaced.
        """
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Built on the meta device and given the state dict's own tensors: no random init and
        # no second copy of a multi-billion-parameter model.
        with torch.device("meta"):
            student = self.transformer_class.from_config(self.teacher.config)
        student.load_state_dict(student_state_dict, assign=True)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            self.scheduler.config, stochastic_sampling=False
        )
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-", dir=out_dir.parent) as tmp:
            staged = Path(tmp) / out_dir.name
            shutil.copytree(
                self.bundle_dir, staged, ignore=shutil.ignore_patterns("transformer", "scheduler")
            )
            student.save_pretrained(staged / "transformer", safe_serialization=True)
            scheduler.save_pretrained(staged / "scheduler")
            (staged / SAMPLING_FILE).write_text(json.dumps(self.sampling, indent=2) + "\n")
            if out_dir.exists():
                # Move the old bundle into staging so the context manager deletes it.
                out_dir.rename(Path(tmp) / "replaced")
            staged.rename(out_dir)

    def _timestep(self, sigma: Tensor) -> Tensor:
        # The scheduler's (and pipeline's) timestep convention: sigma * num_train_timesteps.
        return sigma.flatten() * self.scheduler.config.num_train_timesteps  # (B,)


def _skip_step_grid(
    scheduler: FlowMatchEulerDiscreteScheduler,
    family: Family,
    transformer_config: Any,
    latent_size: tuple[int, ...],
    num_teacher_steps: int,
    student_steps: int,
) -> tuple[Tensor, Tensor]:
    """The teacher's sigmas merged with the student's, each as the family's pipeline samples
    them at ``latent_size`` (h, w), and each point's phase edge.

    Returns descending `sigmas` ending in 0 and `edges`, where edges[i] is the largest student
    sigma below sigmas[i] (0 for the last point, which is never a start point).
    """

    def pipeline_sigmas(steps: int) -> Tensor:
        kwargs = family.timestep_kwargs(scheduler.config, transformer_config, steps, latent_size)
        retrieve_timesteps(scheduler, steps, "cpu", **kwargs)
        return scheduler.sigmas.clone()  # (steps + 1,)

    teacher_sigmas = pipeline_sigmas(num_teacher_steps)
    student_sigmas = pipeline_sigmas(student_steps)
    sigmas = torch.cat([teacher_sigmas, student_sigmas]).sort(descending=True).values
    # Points both grids hold (1.0, the last nonzero sigma, 0, more where the spacings divide)
    # may differ in the last float bit; a near-zero teacher step between the two copies would
    # only teach the student to match itself.
    keep = torch.cat([torch.tensor([True]), sigmas[:-1] - sigmas[1:] > 1e-6])
    sigmas = sigmas[keep]  # (M,)
    # Edges are taken from `sigmas` itself so that a teacher step landing on an edge gives
    # edge - sigma_next == 0 exactly: the boundary condition holds without a special case.
    is_edge = (sigmas[:, None] - student_sigmas[None, :]).abs().min(dim=1).values <= 1e-6
    edges = torch.zeros_like(sigmas)  # (M,)
    for i in range(len(sigmas) - 1):
        edges[i] = sigmas[i + 1 :][is_edge[i + 1 :]][0]
    return sigmas, edges


@torch.no_grad()
def distance_to_teacher(
    teacher_dir: str | Path,
    student_dir: str | Path,
    prompts: list[str],
    *,
    seed: int,
    student_steps_list: tuple[int, ...] = (1, 2, 4),
    teacher_steps: int = 4,
    reference_steps: int = 32,
    guidance_scale: float = 4.5,
    max_sequence_length: int = 256,
) -> dict[str, float]:
    """Latent MSE of few-step samples against the teacher's `reference_steps` CFG sample.

    Every sample starts from the same initial noise, drawn once from `seed` for all prompts. The
    student samples with its own bundle's scheduler and guidance 1.0 (guidance is folded in);
    the teacher with `guidance_scale`. Keys: "student_<steps>" and "teacher_<teacher_steps>".
    Pipelines run on the CPU in float32, at the transformer's default sample size, with
    prompts encoded to `max_sequence_length` T5 tokens: the student only matches its teacher
    at the prompt-embedding length it was distilled with.
    """
    teacher = family_of(teacher_dir, media="image").pipeline.from_pretrained(teacher_dir)
    student = family_of(student_dir, media="image").pipeline.from_pretrained(student_dir)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)

    size = teacher.transformer.config.sample_size
    shape = (len(prompts), teacher.transformer.config.in_channels, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # (P, C, h, w)

    def sample(pipe: DiffusionPipeline, steps: int, guidance: float) -> Tensor:
        return pipe(
            prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise,
            max_sequence_length=max_sequence_length,
            output_type="latent",
        ).images  # (P, C, h, w)

    reference = sample(teacher, reference_steps, guidance_scale)
    distances = {
        f"student_{steps}": F.mse_loss(sample(student, steps, 1.0), reference).item()
        for steps in student_steps_list
    }
    distances[f"teacher_{teacher_steps}"] = F.mse_loss(
        sample(teacher, teacher_steps, guidance_scale), reference
    ).item()
    return distances


def distillation(
    config: DistillConfig, plan: RunPlan, device: torch.device
) -> LatentConsistencyDistillation:
    """The objective the shared Ray Train loop builds on each worker."""
    empty = plan.empty_prompt
    return LatentConsistencyDistillation(
        plan.bundle_dir,
        empty_prompt_embeds=torch.from_numpy(empty["prompt_embeds"])[None],  # (1, L, D)
        empty_pooled_prompt_embeds=torch.from_numpy(empty["pooled_prompt_embeds"])[None],
        guidance_scale=config.guidance_scale,
        num_teacher_steps=config.num_teacher_steps,
        student_steps=config.student_steps,
        target_ema_decay=config.target_ema_decay,
        device=device,
    )


def student_sampling(config: DistillConfig, plan: RunPlan) -> DistillConfig:
    """The config with the loop's grids and scores drawn as the student will be sampled: a
    student that is told its guidance (Flux dev) is told ``guidance_scale``, the scale it
    folds in, unless ``sample_guidance_scale`` was set; others sample at 1 (the default)."""
    transformer_config = component_config(plan.bundle_dir, plan.family.denoisers[0])
    embedded = plan.family.guidance(transformer_config) == "embedded"
    if embedded and "sample_guidance_scale" not in config.model_fields_set:
        return config.model_copy(update={"sample_guidance_scale": config.guidance_scale})
    return config


def run_distill(config: DistillConfig) -> RunResult:
    """`raygen distill`: the training loop of flows/train.py with this objective."""
    if config.parallelism == "fsdp":
        # The target network's EMA reads the student's full parameters every step.
        raise ConfigError("parallelism: distillation runs with ddp (the student fits a device)")
    if config.num_teacher_steps < config.student_steps:
        raise ConfigError(
            f"num_teacher_steps: {config.num_teacher_steps} is below student_steps "
            f"{config.student_steps}: the student learns to jump over teacher steps"
        )
    plan = plan_shards(config, config.teacher.uri, "distill", media=("image",))
    if not plan.family.flow_matching:
        raise ConfigError(
            f"teacher: {config.teacher.uri} is a {plan.pipeline_class}, a noise-prediction "
            "family; raygen distill distills flow-matching teachers (SD3, Flux)"
        )
    config = student_sampling(config, plan)
    result = run_loop(config, plan, distillation, "distill")
    print(
        f"[raygen distill] {result.steps} steps; student bundle ({config.student_steps} steps, "
        f"guidance folded in): {result.bundle}",
        flush=True,
    )
    return result
