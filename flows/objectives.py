"""Training objectives: what one step of `raygen train` computes (the loop in flows/train.py
owns everything else), and how the loop shards a model with FSDP.

Nothing here imports Ray, so a process without it (benchmarks/gpu.py on a lent GPU machine)
runs the same objective and the same sharding as a Ray Train worker.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from actors.families import Family, component_config
from cluster.bundles import ADAPTER_FILE
from schemas.config import AdapterConfig, ConfigError, TrainConfig


class ObjectivePlan(Protocol):
    """What an objective reads of a run's plan (flows/train.py's ``RunPlan`` has it)."""

    bundle_dir: str  # a local folder of the bundle
    bundle_uri: str  # as the config names it: what an exported LoRA records as its base
    empty_prompt: dict[str, np.ndarray]  # "prompt_embeds" (L, D), "pooled_prompt_embeds" (D,)

    @property
    def family(self) -> Family: ...


class Objective(Protocol):
    model: torch.nn.Module  # the trainable module: wrapped, EMA-tracked, exported
    output_name: str  # the folder of the output its export is written to

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def after_optimizer_step(self, model: torch.nn.Module) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None: ...


class StatelessObjective:
    """The Objective methods of an objective with no state of its own beyond the model and
    nothing to do after an optimizer step (distillation's target network is the other kind)."""

    output_name = "bundle"

    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class DenoisingObjective(StatelessObjective):
    """What the training objectives share: the bundle's denoiser (its weights, a fresh one
    from its config with ``init: scratch``, or frozen with a LoRA), classifier-free-guidance
    dropout to the empty prompt's embeddings (probability ``cfg_dropout``), the call as the
    family's pipeline makes it, and the export (the bundle with the new denoiser, or the
    LoRA)."""

    def __init__(self, config: TrainConfig, plan: ObjectivePlan, device: torch.device) -> None:
        component = plan.family.denoisers[0]  # "transformer", or SDXL's "unet"
        model_cls = plan.family.denoiser_class(plan.bundle_dir)
        if config.init == "scratch":
            model_config = model_cls.load_config(plan.bundle_dir, subfolder=component)
            model = model_cls.from_config({**model_config, **config.transformer_config})
        else:
            model = model_cls.from_pretrained(plan.bundle_dir, subfolder=component)
        if config.adapter is not None:
            add_lora(model, config.adapter)
            self.output_name = "adapter"
        self.model = model.to(device).train()
        self.scheduler_config = component_config(plan.bundle_dir, "scheduler")
        self.num_train_timesteps = int(self.scheduler_config["num_train_timesteps"])
        self.config, self.plan, self.device = config, plan, device
        # A copy: the plan's arrays arrive read-only from Ray's object store.
        self.empty = {k: torch.tensor(v, device=device) for k, v in plan.empty_prompt.items()}
        # A guidance-distilled transformer (Flux dev) is told a guidance scale at every step.
        self.embeds_guidance = plan.family.guidance(model.config) == "embedded"

    def predict(
        self,
        model: torch.nn.Module,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The model's prediction (B, C, ...) for ``noisy`` at ``timestep`` (B,), in the
        scheduler's units, with the batch's conditioning after CFG dropout."""
        b = noisy.shape[0]
        drop = torch.rand(b, generator=generator, device=self.device) < self.config.cfg_dropout
        prompt_embeds = where_rows(drop, self.empty["prompt_embeds"], batch["prompt_embeds"])
        pooled = None
        if "pooled_prompt_embeds" in batch:
            pooled = where_rows(
                drop, self.empty["pooled_prompt_embeds"], batch["pooled_prompt_embeds"]
            )
        guidance = None
        if self.embeds_guidance:
            guidance = torch.full((b,), self.config.guidance_scale, device=self.device)
        image = None
        if "image_embeds" in batch:  # image-to-video: the clip's first frame, never dropped
            image = (batch["image_embeds"], batch["image_condition"])
        return self.plan.family.predict(
            model, noisy, timestep, prompt_embeds, pooled, guidance, batch.get("time_ids"), image
        )

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        plan = self.plan
        if self.config.adapter is not None:
            export_lora(plan.family, plan.bundle_uri, self.config.adapter, state_dict, out_dir)
        else:
            component = plan.family.denoisers[0]
            export_bundle(plan.bundle_dir, self.model, state_dict, out_dir, component)


class RectifiedFlow(DenoisingObjective):
    """SD3's training objective (Esser et al. 2024, "Scaling Rectified Flow Transformers"),
    for the flow-matching families (SD3, Flux, Wan).

    x_sigma = (1 - sigma) x0 + sigma noise, the model predicts the velocity noise - x0;
    sigma comes from logit-normal u shifted by the scheduler's shift (SD3's time shift, as
    the bundle's scheduler samples).
    """

    def __init__(self, config: TrainConfig, plan: ObjectivePlan, device: torch.device) -> None:
        super().__init__(config, plan, device)
        scheduler = self.scheduler_config
        # FlowMatchEulerDiscreteScheduler calls it shift, Wan's UniPC flow_shift.
        self.shift = float(scheduler["shift"] if "shift" in scheduler else scheduler["flow_shift"])

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        latents = batch["latents"]  # (B, C, h, w) or (B, C, f, h, w), scaled
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        u = compute_density_for_timestep_sampling(
            "logit_normal",
            b,
            self.config.logit_mean,
            self.config.logit_std,
            device=self.device,
            generator=generator,
        )  # (B,)
        sigmas = self.shift * u / (1 + (self.shift - 1) * u)  # (B,)
        sigma = sigmas.view(b, *([1] * (latents.ndim - 1)))
        noisy = (1 - sigma) * latents + sigma * noise
        prediction = self.predict(
            model, noisy, sigmas * self.num_train_timesteps, batch, generator
        )  # (B, C, ...)
        loss = torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())
        return loss, {"sigma_mean": sigmas.mean().item()}


class NoisePrediction(DenoisingObjective):
    """The DDPM-family objective SDXL trains with, as diffusers' train_text_to_image_sdxl:
    timesteps uniform over the bundle scheduler's training steps, its ``add_noise``, and the
    target its ``prediction_type`` names (epsilon: the noise; v_prediction: its
    ``get_velocity``). With ``snr_gamma``, min-SNR weighting (Hang et al. 2023,
    arXiv:2303.09556) as diffusers computes it.
    """

    def __init__(self, config: TrainConfig, plan: ObjectivePlan, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        super().__init__(config, plan, device)
        # The training noise schedule of the bundle's scheduler config, as diffusers' scripts
        # build it (the sampler class does not matter: the betas do).
        self.noise_scheduler = DDPMScheduler.from_config(self.scheduler_config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(
                f"bundle: scheduler prediction_type {self.prediction_type!r}; training takes "
                "epsilon or v_prediction"
            )

    def loss(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from diffusers.training_utils import compute_snr

        latents = batch["latents"]  # (B, C, h, w), scaled
        b = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(
            self.num_train_timesteps, (b,), generator=generator, device=self.device
        )  # (B,)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        prediction = self.predict(model, noisy, timesteps, batch, generator).float()
        if self.config.snr_gamma is None:
            loss = torch.nn.functional.mse_loss(prediction, target.float())
        else:
            snr = compute_snr(self.noise_scheduler, timesteps)  # (B,)
            weights = torch.clamp(snr, max=self.config.snr_gamma) / snr
            if self.prediction_type == "v_prediction":
                weights = torch.clamp(snr, max=self.config.snr_gamma) / (snr + 1)
            per_row = torch.nn.functional.mse_loss(prediction, target.float(), reduction="none")
            loss = (per_row.mean(dim=tuple(range(1, per_row.ndim))) * weights).mean()
        return loss, {"timestep_mean": timesteps.float().mean().item()}


def training_objective(family: Family) -> type[DenoisingObjective]:
    """The objective a family trains with: rectified flow, or noise prediction (SDXL)."""
    return RectifiedFlow if family.flow_matching else NoisePrediction


def add_lora(model: torch.nn.Module, adapter: AdapterConfig) -> None:
    """Freeze ``model`` and give it a LoRA (peft, through diffusers' ``add_adapter``, as
    diffusers' DreamBooth-LoRA scripts do): only the LoRA matrices train, kept in fp32 (bf16
    comes from autocast on GPU)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.alpha or adapter.rank,
            lora_dropout=adapter.dropout,
            init_lora_weights="gaussian",
            target_modules=adapter.target_modules,
        )
    )
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def lora_layers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA matrices of a state dict, named as peft's ``get_peft_model_state_dict`` names
    them (the default adapter's name left out): what ``save_lora_weights`` takes."""
    return {
        key.replace(".default.", "."): value
        for key, value in state_dict.items()
        if ".lora_A." in key or ".lora_B." in key
    }


def export_lora(
    family: Family,
    base: str,
    adapter: AdapterConfig,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
) -> None:
    """``pytorch_lora_weights.safetensors`` written by the family pipeline's own
    ``save_lora_weights`` (``pipe.load_lora_weights(dir)`` loads it unchanged), and beside it
    the base bundle it was trained on."""
    # transformer_lora_layers, or SDXL's unet_lora_layers.
    layers = {f"{family.denoisers[0]}_lora_layers": lora_layers(state_dict)}
    family.pipeline.save_lora_weights(out_dir, **layers, safe_serialization=True)
    recorded = {"base": base, **adapter.model_dump(mode="json")}
    (Path(out_dir) / ADAPTER_FILE).write_text(json.dumps(recorded, indent=1) + "\n")


def export_bundle(
    bundle_dir: str | Path,
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    component: str = "transformer",
) -> None:
    """The source bundle with its denoiser (``component``) replaced: what diffusers and
    `raygen serve` load."""
    out = Path(out_dir)
    shutil.copytree(bundle_dir, out, ignore=shutil.ignore_patterns(component), dirs_exist_ok=True)
    weights = unwrapped_copy(model)
    weights.load_state_dict(state_dict)
    weights.save_pretrained(out / component, safe_serialization=True)


def unwrapped_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new CPU instance of a diffusers model's own class and config (and LoRA, if it has
    one), to load full weights into: FSDP2 swaps in a subclass of the model and refuses
    deepcopy."""
    cls = next(c for c in type(model).__mro__ if c.__module__.startswith("diffusers."))
    copy = cls.from_config(model.config)
    for name, adapter in getattr(model, "peft_config", {}).items():
        copy.add_adapter(adapter, adapter_name=name)
    return copy


def where_rows(mask: torch.Tensor, replacement: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row: ``replacement`` where ``mask``, else ``values`` (B, ...)."""
    return torch.where(mask.view(-1, *([1] * (values.ndim - 1))), replacement, values)


def shard_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` under FSDP2 (``fully_shard``) over the default process group: each
    transformer block, then the rest, the unit diffusers itself keeps whole."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or ()):
            fully_shard(module)
    return fully_shard(model)
