"""Model families: everything raygen knows about a kind of bundle, written once.

A family (SD3, Flux, SDXL and its refiner, SD 1.x/2.x for images; Wan text-to-video and
image-to-video) is one ``Family`` entry in ``FAMILIES``, keyed by the pipeline class a bundle's
``model_index.json`` names (``_class_name``). Its numbers are read from the bundle's component configs (VAE
downscale, latent factors, patch size, text widths), so a published checkpoint and a tiny
bundle of the same class are treated alike; its prompt encoding is the pipeline's own
``encode_prompt``. Prep's encoders, train's plan and objective, serve's stages and request
checks and distillation all ask ``family_of(bundle)``; no other module knows a family's
facts. That includes how its transformer is called (``predict``: SD3's and Wan's take
latents as they are, Flux packs 2x2 latent patches into a sequence with position ids), which
timesteps its pipeline samples (``timestep_kwargs``) and what its guidance is (``guidance``:
classifier-free, or an input of a guidance-distilled transformer).

Adding a family is one more entry here, and its tests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cluster.bundles import read_bundle_json
from cluster.storage import Storage
from schemas.errors import RaygenError

# Torch and diffusers are imported where a family's models are (they take seconds to import):
# a process that only reads a family's facts (the serving graph's ingress, its request
# checks) starts without them.
if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline, WanPipeline

Media = Literal["image", "video"]
# How a family guides: "cfg", classifier-free (an unconditional pass, mixed by the scale);
# "embedded", the scale is an input of a guidance-distilled transformer (Flux dev), one pass;
# "none", neither (Flux schnell): the scale is ignored.
Guidance = Literal["cfg", "embedded", "none"]
Bundle = str | Path  # a bundle folder, local or s3://
Config = Mapping[str, Any]  # a component's config: a dict, or a loaded component's .config
GROUPS = ("text_encoders", "tokenizers", "denoisers", "vae", "image_encoders")


class FamilyError(RaygenError):
    """A bundle whose pipeline class raygen has no family for, or of the wrong media kind."""


def family_of(
    bundle: Bundle | Config, storage: Storage | None = None, *, media: Media | None = None
) -> Family:
    """The family of a bundle folder (local or s3://; only its model_index.json is read) or
    of a model_index.json already read. ``media``: the kind the caller makes; a bundle of the
    other kind is an error, as is a pipeline class no family has."""
    if isinstance(bundle, Mapping):
        index, shown = bundle, "bundle"
    else:
        index, shown = read_bundle_json(bundle, "model_index.json", storage), f"bundle {bundle}"
    class_name = index.get("_class_name")
    family = FAMILIES.get(class_name)
    if family is None:
        raise FamilyError(
            f"{shown}: a {class_name} pipeline, which raygen has no family for; "
            f"it supports {', '.join(FAMILIES)}"
        )
    if media is not None and family.media != media:
        raise FamilyError(
            f"{shown}: a {class_name} makes {family.media}s, but this needs one that makes {media}s"
        )
    return family


def latent_space(bundle: Bundle, storage: Storage | None = None) -> dict[str, Any]:
    """What a bundle's latents are (family, latent channels, VAE downscale, latent factors),
    from its configs: two bundles whose latent spaces are equal can hand latents on."""
    family = family_of(bundle, storage, media="image")
    vae = component_config(bundle, family.vae, storage)
    return {
        "family": family.latents_of or family.name,
        "latent channels": vae["latent_channels"],
        "downscale": family.multiples(bundle, storage).latent,
        **family.latent_factors(vae),
    }


def component_config(
    bundle: Bundle, component: str, storage: Storage | None = None
) -> dict[str, Any]:
    """A diffusers component's config as the loaded component's ``.config`` holds it: its
    config.json over the defaults of its class (as model_index.json names it). No weights are
    read, and an s3:// bundle is not downloaded."""
    library, class_name = read_bundle_json(bundle, "model_index.json", storage)[component]
    assert library == "diffusers", f"{component} is a {library} component, not a diffusers one"
    parameters = inspect.signature(_diffusers_class(class_name).__init__).parameters
    defaults = {
        name: parameter.default
        for name, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    filename = "scheduler_config.json" if "Scheduler" in class_name else "config.json"
    return {**defaults, **read_bundle_json(bundle, f"{component}/{filename}", storage)}


def _diffusers_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


@dataclass(frozen=True)
class Multiples:
    """What a bundle fixes about output shapes, from its VAE and transformer configs."""

    latent: int  # pixels per latent position along a side: the VAE's spatial downscale
    size: int  # sides must be multiples of this: latent x the transformer's patch size
    frames: int | None = None  # video: num_frames - 1 a multiple of it (VAE temporal downscale)

    def check_size(self, height: int, width: int) -> None:
        if height % self.size or width % self.size:
            raise ValueError(f"height and width must be multiples of {self.size}: {height}x{width}")

    def check_frames(self, num_frames: int, field: str = "num_frames") -> None:
        """Raises a RaygenError naming ``field`` unless the VAE takes ``num_frames``."""
        assert self.frames is not None, "an image bundle has no frame multiple"
        if (num_frames - 1) % self.frames:
            examples = ", ".join(str(k * self.frames + 1) for k in range(1, 5))
            raise RaygenError(
                f"{field}: {num_frames} frames, but the video VAE takes {self.frames}k+1 frames "
                f"({examples}, ...): num_frames - 1 must be a multiple of {self.frames}"
            )

    def latent_frames(self, num_frames: int) -> int:
        assert self.frames is not None, "an image bundle has no frame multiple"
        return (num_frames - 1) // self.frames + 1


# ---------------------------------------------------------------------------------------
# Latent normalisation: stored latents are the VAE's raw ones; the transformer works on
# normalised latents, and the decoder undoes the normalisation, each with the same ops as
# the family's pipeline so the bits match.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleShift:
    """One scale and an optional shift (SD3, Flux, SDXL): ``(latents - shift) * scale``."""

    keys: tuple[str, ...] = ("scaling_factor", "shift_factor")

    def normalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        # VAE configs older than SD3's have shift_factor None: they shift by nothing.
        if factors["shift_factor"] is not None:
            latents = latents - factors["shift_factor"]
        return latents * factors["scaling_factor"]

    def denormalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        latents = latents / factors["scaling_factor"]
        if factors["shift_factor"] is not None:
            latents = latents + factors["shift_factor"]
        return latents

    def fit(self, latents: torch.Tensor, factors: Config) -> dict[str, Any]:
        """Factors that bring ``latents`` (B, C, ...) of a VAE to zero mean and unit variance,
        as SD3's were measured: one scalar each. A VAE without a shift keeps none."""
        shift = float(latents.mean()) if factors["shift_factor"] is not None else None
        spread = latents - shift if shift is not None else latents
        return {"scaling_factor": 1.0 / float(spread.std()), "shift_factor": shift}


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel mean and std (Wan): ``(latents - mean) / std`` on (B, C, ...) latents."""

    keys: tuple[str, ...] = ("latents_mean", "latents_std")

    def normalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        mean, std = self._stats(latents, factors)
        return (latents - mean.to(latents)) / std.to(latents)

    def denormalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        mean, std = self._stats(latents, factors)
        # WanPipeline divides by 1 / std: the same float32 ops, so the same bits.
        return latents / (1.0 / std).to(latents) + mean.to(latents)

    def _stats(self, latents: torch.Tensor, factors: Config) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        shape = (1, -1, *[1] * (latents.ndim - 2))  # broadcast over (B, C, ...)
        mean = torch.tensor(factors["latents_mean"]).view(shape)
        std = torch.tensor(factors["latents_std"]).view(shape)
        return mean, std


# ---------------------------------------------------------------------------------------
# The family record and its entries.
# ---------------------------------------------------------------------------------------

Encode = Callable[[Any, list[str], int], "tuple[torch.Tensor, torch.Tensor | None]"]
Tokenize = Callable[[Any, list[str], int], dict[str, np.ndarray]]
# (transformer, latents, timestep, prompt_embeds, pooled or None, guidance or None) -> prediction
Forward = Callable[..., "torch.Tensor"]
# (scheduler config, transformer config, num_inference_steps, latent (h, w)) -> kwargs
Timesteps = Callable[[Config, Config, int, tuple[int, int]], dict[str, Any]]


def _mmdit_forward(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """SD3's and Wan's call: latents (B, C, ...) in, the same shape out; the timestep in the
    scheduler's units. Wan pools nothing; neither embeds guidance."""
    conditioning = {} if pooled is None else {"pooled_projections": pooled}
    return transformer(
        hidden_states=latents,
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        return_dict=False,
        **conditioning,
    )[0]


def _no_timestep_kwargs(
    scheduler: Config, transformer: Config, num_inference_steps: int, latent_size: tuple[int, int]
) -> dict[str, Any]:
    return {}


def _in_channels(transformer: Config) -> int:
    return transformer["in_channels"]


def _patch_size(transformer: Config) -> tuple[int, ...]:
    patch = transformer["patch_size"]
    return tuple(patch) if isinstance(patch, list | tuple) else (patch, patch)  # (t?, h, w)


def _classifier_free(transformer: Config) -> Guidance:
    return "cfg"


def _never(pipe: Any) -> bool:
    return False


def _no_aesthetic(pipe: Any) -> tuple[float, float] | None:
    return None


def _mmdit_text_widths(transformer: Config) -> tuple[int, int | None]:
    return transformer["joint_attention_dim"], transformer["pooled_projection_dim"]


@dataclass(frozen=True)
class Family:
    """One model family: its pipeline class and media kind, which components each stage
    loads, how prompts are encoded, how latents are normalised, and which config keys give
    its shape multiples and text widths. Numbers come from a bundle's configs, never from
    here."""

    name: str
    class_name: str  # the diffusers pipeline class, as model_index.json names it
    media: Media
    # Component groups, named as in model_index.json; the scheduler holds no weights and
    # always loads.
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    denoisers: tuple[str, ...]  # the first is the one raygen trains
    vae: str
    latents: ScaleShift | ChannelStats
    _text_widths: Callable[[Config], tuple[int, int | None]]  # sequence, pooled (or None)
    _encode: Encode
    _tokenize: Tokenize
    _multiples: Callable[[Config, Config], Multiples]
    _forward: Forward = _mmdit_forward
    _timestep_kwargs: Timesteps = _no_timestep_kwargs
    _latent_channels: Callable[[Config], int] = _in_channels
    _patch: Callable[[Config], tuple[int, ...]] = _patch_size
    _guidance: Callable[[Config], Guidance] = _classifier_free
    # SDXL's micro-conditioning: the transformer also reads (original size, crop top-left,
    # target size) as time ids.
    size_conditioning: bool = False
    # Trained and sampled as a flow (SD3, Flux, Wan), or as DDPM-family noise prediction
    # (SDXL: epsilon or v from its scheduler config).
    flow_matching: bool = True
    # Whether the pipeline sends zeros, not the encoded "", as a missing negative prompt.
    _zero_negative: Callable[[Any], bool] = _never
    # SDXL's refiner: the (positive, negative) aesthetic scores its time ids end with, where
    # the pipeline's config asks for them; None for a family without.
    _aesthetic: Callable[[Any], tuple[float, float] | None] = _no_aesthetic
    # Whose latents these are, where another family's (SDXL's refiner continues SDXL's).
    latents_of: str | None = None
    # What an image-conditioned family (Wan image-to-video) encodes its input image with: the
    # image encoder and its processor, as model_index.json names them; none for the others.
    image_encoders: tuple[str, ...] = ()

    @property
    def conditions_on_image(self) -> bool:
        """Whether the family's pipeline animates an input image (takes ``image``)."""
        return bool(self.image_encoders)

    @property
    def pipeline(self) -> type[DiffusionPipeline]:
        return _diffusers_class(self.class_name)

    def denoiser_class(self, bundle: Bundle, storage: Storage | None = None) -> type:
        """The diffusers class of the bundle's trained denoiser, as model_index.json names it."""
        _, class_name = read_bundle_json(bundle, "model_index.json", storage)[self.denoisers[0]]
        return _diffusers_class(class_name)

    def unloaded(self, *keep: str) -> dict[str, None]:
        """``from_pretrained`` arguments that leave every component outside the ``keep``
        groups (of ``GROUPS``) unloaded."""
        assert set(keep) <= set(GROUPS), f"unknown groups {set(keep) - set(GROUPS)}"
        groups = {
            "text_encoders": self.text_encoders,
            "tokenizers": self.tokenizers,
            "denoisers": self.denoisers,
            "vae": (self.vae,),
            "image_encoders": self.image_encoders,
        }
        return dict.fromkeys(
            name for group, names in groups.items() if group not in keep for name in names
        )

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pipeline's own ``encode_prompt`` for ``prompts``, without classifier-free
        guidance (a negative prompt is encoded as a prompt, as the pipeline does): (B, L, D)
        sequence embeddings and (B, D_pooled) pooled ones, None where the family has none."""
        import torch

        with torch.no_grad():
            return self._encode(pipe, prompts, max_sequence_length)

    def tokenize(
        self, pipe: DiffusionPipeline, prompts: list[str], max_sequence_length: int
    ) -> dict[str, np.ndarray]:
        """(B, L) token ids per text encoder, padded and truncated as the pipeline feeds its
        encoders; keyed by what the encoder is ("clip_l", "clip_g", "t5")."""
        return self._tokenize(pipe, prompts, max_sequence_length)

    def multiples(self, bundle: Bundle, storage: Storage | None = None) -> Multiples:
        """The bundle's shape multiples, from its VAE and transformer configs.

        A config.json diffusers saved holds every init argument: read as it is, it needs no
        diffusers import (prep's driver checks shapes with this before any worker starts, and
        importing diffusers costs it seconds). A hand-written config that leaves a key to its
        class's default is read over the class's defaults."""
        components = (self.vae, self.denoisers[0])
        try:
            return self._multiples(
                *(read_bundle_json(bundle, f"{name}/config.json", storage) for name in components)
            )
        except KeyError:
            return self._multiples(*(component_config(bundle, n, storage) for n in components))

    def fit_latent_factors(self, latents: torch.Tensor, vae_config: Config) -> dict[str, Any]:
        """The VAE config entries that normalise ``latents`` (B, C, ...), the VAE's own on
        data: what a bundle with a newly trained VAE records."""
        if not hasattr(self.latents, "fit"):
            raise FamilyError(f"{self.name}: fitting its latent statistics is not supported")
        return self.latents.fit(latents, vae_config)

    def latent_factors(self, vae_config: Config) -> dict[str, Any]:
        """What ``normalize`` needs of the VAE's config; prep records it in the manifest."""
        return {key: vae_config[key] for key in self.latents.keys}

    def normalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        """The VAE's latents (B, C, ...) to the transformer's scale; ``factors`` is the VAE's
        config or its ``latent_factors``."""
        return self.latents.normalize(latents, factors)

    def denormalize(self, latents: torch.Tensor, factors: Config) -> torch.Tensor:
        """The transformer's latents (B, C, ...) back to the VAE's, as the pipeline's tail
        does before decoding."""
        return self.latents.denormalize(latents, factors)

    def predict(
        self,
        transformer: torch.nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        image: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The transformer's prediction (B, C, ...) for normalised latents (B, C, ...), called
        as the family's pipeline calls it: ``timestep`` (B,) in the scheduler's units
        (sigma x num_train_timesteps), ``prompt_embeds`` (B, L, D), ``pooled`` (B, D_pooled)
        for a family that pools, ``guidance`` (B,) for one that embeds it, ``time_ids``
        (B, 6) for one with size conditioning, ``image`` (image tokens (B, N, D), first-frame
        condition (B, 4 + C, f, h, w)) for one that animates an image: the condition joins
        the latents' channels, as WanImageToVideoPipeline feeds them. Latents stay
        (B, C, h, w) outside: a family that packs them does so here and undoes it."""
        if self.conditions_on_image:
            assert image is not None, f"{self.name}'s denoiser reads the input image"
            return _wan_i2v_forward(transformer, latents, timestep, prompt_embeds, *image)
        if self.size_conditioning:
            assert time_ids is not None, f"{self.name}'s denoiser reads time ids"
            return self._forward(transformer, latents, timestep, prompt_embeds, pooled, time_ids)
        return self._forward(transformer, latents, timestep, prompt_embeds, pooled, guidance)

    def guidance(self, transformer_config: Config) -> Guidance:
        """How a transformer of this config is guided (see ``Guidance``)."""
        return self._guidance(transformer_config)

    def timestep_kwargs(
        self,
        scheduler_config: Config,
        transformer_config: Config,
        num_inference_steps: int,
        latent_size: tuple[int, int],
    ) -> dict[str, Any]:
        """What the family's pipeline passes ``retrieve_timesteps`` besides the step count
        (sigmas, the resolution-dependent shift ``mu``) for latents of ``latent_size`` (h, w)."""
        return self._timestep_kwargs(
            scheduler_config, transformer_config, num_inference_steps, latent_size
        )

    def latent_channels(self, transformer_config: Config) -> int:
        """The latent channels (the VAE's) a transformer of this config denoises."""
        return self._latent_channels(transformer_config)

    def latent_patch(self, transformer_config: Config) -> tuple[int, ...]:
        """What latent sides (frames first for video) must be multiples of: the transformer's
        patch, or the pipeline's packing."""
        return self._patch(transformer_config)

    def text_widths(self, transformer_config: Config) -> tuple[int, int | None]:
        """(sequence embedding width, pooled embedding width or None) the transformer reads."""
        return self._text_widths(transformer_config)

    def zero_negative(self, pipe: DiffusionPipeline) -> bool:
        """Whether ``pipe`` stands in zeros for a missing negative prompt (SDXL's
        ``force_zeros_for_empty_prompt``) rather than the encoded empty text."""
        return self._zero_negative(pipe)

    def aesthetic_scores(self, pipe: DiffusionPipeline) -> tuple[float, float] | None:
        """The (positive, negative) aesthetic scores ``pipe`` ends its time ids with (SDXL's
        refiner, ``requires_aesthetics_score``: the pipeline's defaults 6.0 and 2.5), or None."""
        return self._aesthetic(pipe)

    def time_ids(
        self,
        original_size: tuple[int, int],
        crop_top_left: tuple[int, int],
        target_size: tuple[int, int],
        aesthetic_score: float | None = None,
    ) -> list[float]:
        """SDXL's time ids, as the pipelines' ``_get_add_time_ids`` list them: six (sizes and
        crop), or five for a refiner that reads an ``aesthetic_score`` in place of the target
        size."""
        assert self.size_conditioning, f"{self.name} takes no size conditioning"
        if aesthetic_score is not None:
            return [*original_size, *crop_top_left, aesthetic_score]
        return [*original_size, *crop_top_left, *target_size]


def _t5_tokens(max_sequence_length: int) -> dict[str, Any]:
    """The arguments of the pipelines' own ``_get_t5_prompt_embeds`` tokenizer call."""
    return {
        "padding": "max_length",
        "max_length": max_sequence_length,
        "truncation": True,
        "add_special_tokens": True,
        "return_tensors": "np",
    }


# ---- SD3: CLIP-L + CLIP-G + T5, AutoencoderKL, MMDiT ----------------------------------


def _sd3_encode(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled  # (B, 77 + max_sequence_length, D), (B, D_pooled)


def _sd3_tokenize(
    pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int
) -> dict[str, np.ndarray]:
    # As the pipeline's _get_clip_prompt_embeds / _get_t5_prompt_embeds tokenize.
    clip = {
        "padding": "max_length",
        "max_length": pipe.tokenizer_max_length,
        "truncation": True,
        "return_tensors": "np",
    }
    return {
        "clip_l": pipe.tokenizer(prompts, **clip).input_ids,
        "clip_g": pipe.tokenizer_2(prompts, **clip).input_ids,
        "t5": pipe.tokenizer_3(prompts, **_t5_tokens(max_sequence_length)).input_ids,
    }


def _sd3_multiples(vae: Config, transformer: Config) -> Multiples:
    # As StableDiffusion3Pipeline computes it: one halving per VAE level but the last.
    latent = 2 ** (len(vae["block_out_channels"]) - 1)
    return Multiples(latent=latent, size=latent * transformer["patch_size"])


def _sd3_timestep_kwargs(
    scheduler: Config, transformer: Config, num_inference_steps: int, latent_size: tuple[int, int]
) -> dict[str, Any]:
    """As StableDiffusion3Pipeline.__call__: with dynamic shifting, the shift follows the image
    token count, between the scheduler config's bounds; otherwise the config's own shift."""
    if not scheduler.get("use_dynamic_shifting"):
        return {}
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    patch = transformer["patch_size"]
    image_seq_len = (latent_size[0] // patch) * (latent_size[1] // patch)
    return {
        "mu": calculate_shift(
            image_seq_len,
            scheduler["base_image_seq_len"],
            scheduler["max_image_seq_len"],
            scheduler["base_shift"],
            scheduler["max_shift"],
        )
    }


SD3 = Family(
    name="sd3",
    class_name="StableDiffusion3Pipeline",
    media="image",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    denoisers=("transformer",),
    vae="vae",
    latents=ScaleShift(),
    _text_widths=_mmdit_text_widths,
    _encode=_sd3_encode,
    _tokenize=_sd3_tokenize,
    _multiples=_sd3_multiples,
    _timestep_kwargs=_sd3_timestep_kwargs,
)


# ---- Flux: CLIP-L pooled + T5, AutoencoderKL, hybrid MMDiT on packed 2x2 latent patches ----


def _flux_encode(
    pipe: FluxPipeline, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled  # (B, max_sequence_length, D) of T5, (B, D_pooled) of CLIP-L


def _flux_tokenize(
    pipe: FluxPipeline, prompts: list[str], max_sequence_length: int
) -> dict[str, np.ndarray]:
    # As the pipeline's _get_clip_prompt_embeds / _get_t5_prompt_embeds tokenize.
    clip = {
        "padding": "max_length",
        "max_length": pipe.tokenizer_max_length,
        "truncation": True,
        "return_tensors": "np",
    }
    return {
        "clip_l": pipe.tokenizer(prompts, **clip).input_ids,
        "t5": pipe.tokenizer_2(prompts, **_t5_tokens(max_sequence_length)).input_ids,
    }


def _flux_multiples(vae: Config, transformer: Config) -> Multiples:
    # As FluxPipeline: the VAE's downscale, and latent sides even for the 2x2 packing.
    latent = 2 ** (len(vae["block_out_channels"]) - 1)
    return Multiples(latent=latent, size=latent * 2)


def _flux_forward(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """FluxPipeline's call: (B, C, h, w) latents packed into (B, h/2 * w/2, 4C) tokens with
    their (row, column) ids, text ids all zero, the timestep as a fraction (t / 1000)."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    packed = FluxPipeline._pack_latents(latents, b, c, h, w)  # (B, h/2 * w/2, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(
        b, h // 2, w // 2, latents.device, latents.dtype
    )  # (h/2 * w/2, 3)
    text_ids = prompt_embeds.new_zeros(prompt_embeds.shape[1], 3)  # (L, 3)
    prediction = transformer(
        hidden_states=packed,
        timestep=timestep.to(latents.dtype) / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]  # (B, h/2 * w/2, 4C)
    # FluxPipeline._unpack_latents' view and permute, from latent sides.
    prediction = prediction.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return prediction.reshape(b, c, h, w)


def _flux_timestep_kwargs(
    scheduler: Config, transformer: Config, num_inference_steps: int, latent_size: tuple[int, int]
) -> dict[str, Any]:
    """As FluxPipeline.__call__: sigmas spaced evenly from 1 to 1/N, and the shift ``mu`` from
    the packed token count (a dynamic-shifting scheduler uses it, a fixed one ignores it)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if scheduler.get("use_flow_sigmas"):
        sigmas = None
    image_seq_len = (latent_size[0] // 2) * (latent_size[1] // 2)
    mu = calculate_shift(
        image_seq_len,
        scheduler.get("base_image_seq_len", 256),
        scheduler.get("max_image_seq_len", 4096),
        scheduler.get("base_shift", 0.5),
        scheduler.get("max_shift", 1.15),
    )
    return {"sigmas": sigmas, "mu": mu}


def _flux_latent_channels(transformer: Config) -> int:
    return transformer["in_channels"] // 4  # 2x2 patches packed into the channels


def _flux_patch(transformer: Config) -> tuple[int, ...]:
    return (2, 2)  # the pipeline's packing (the transformer's own patch_size is 1)


def _flux_guidance(transformer: Config) -> Guidance:
    # Dev is guidance-distilled: the scale is an input. Schnell takes none.
    return "embedded" if transformer["guidance_embeds"] else "none"


FLUX = Family(
    name="flux",
    class_name="FluxPipeline",
    media="image",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    denoisers=("transformer",),
    vae="vae",
    latents=ScaleShift(),
    _text_widths=_mmdit_text_widths,
    _encode=_flux_encode,
    _tokenize=_flux_tokenize,
    _multiples=_flux_multiples,
    _forward=_flux_forward,
    _timestep_kwargs=_flux_timestep_kwargs,
    _latent_channels=_flux_latent_channels,
    _patch=_flux_patch,
    _guidance=_flux_guidance,
)


# ---- SDXL: CLIP-L + CLIP-G (pooled), AutoencoderKL, UNet with size conditioning ----------


def _sdxl_encode(pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, Any]:
    # CLIP only: SDXL has no T5, so max_sequence_length does not apply.
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, do_classifier_free_guidance=False
    )
    return prompt_embeds, pooled  # (B, 77, D_l + D_g), (B, D_g projected)


def _sdxl_tokenize(
    pipe: Any, prompts: list[str], max_sequence_length: int
) -> dict[str, np.ndarray]:
    return {
        "clip_l": _clip_tokens(pipe.tokenizer, prompts),
        "clip_g": _clip_tokens(pipe.tokenizer_2, prompts),
    }


def _clip_tokens(tokenizer: Any, prompts: list[str]) -> np.ndarray:
    # As the pipelines' encode_prompt tokenizes for each CLIP encoder.
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids


def _sdxl_multiples(vae: Config, unet: Config) -> Multiples:
    # As StableDiffusionXLPipeline: the VAE's downscale (the UNet pads nothing; it resizes
    # its skip connections to any latent size).
    latent = 2 ** (len(vae["block_out_channels"]) - 1)
    return Multiples(latent=latent, size=latent)


def _sdxl_forward(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    time_ids: torch.Tensor | None,
) -> torch.Tensor:
    """StableDiffusionXLPipeline's UNet call: the pooled CLIP-G embedding and the six time ids
    as added conditioning."""
    return unet(
        latents,
        timestep,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )[0]


def _sdxl_text_widths(unet: Config) -> tuple[int, int | None]:
    # The added embedding reads pooled text then six sinusoidal time ids.
    pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
    return unet["cross_attention_dim"], pooled


def _unpatched(unet: Config) -> tuple[int, ...]:
    return (1, 1)


def _sdxl_zero_negative(pipe: Any) -> bool:
    return bool(pipe.config.get("force_zeros_for_empty_prompt", False))


SDXL = Family(
    name="sdxl",
    class_name="StableDiffusionXLPipeline",
    media="image",
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    denoisers=("unet",),
    vae="vae",
    latents=ScaleShift(),
    _text_widths=_sdxl_text_widths,
    _encode=_sdxl_encode,
    _tokenize=_sdxl_tokenize,
    _multiples=_sdxl_multiples,
    _forward=_sdxl_forward,
    _patch=_unpatched,
    size_conditioning=True,
    flow_matching=False,
    _zero_negative=_sdxl_zero_negative,
)


# ---- SDXL's refiner: CLIP-G alone, SDXL's latents, aesthetic-score conditioning ---------


def _sdxl_refiner_tokenize(
    pipe: Any, prompts: list[str], max_sequence_length: int
) -> dict[str, np.ndarray]:
    return {"clip_g": _clip_tokens(pipe.tokenizer_2, prompts)}


def _sdxl_refiner_text_widths(unet: Config) -> tuple[int, int | None]:
    # The added embedding reads pooled text then five ids: sizes, crop, aesthetic score.
    pooled = unet["projection_class_embeddings_input_dim"] - 5 * unet["addition_time_embed_dim"]
    return unet["cross_attention_dim"], pooled


def _sdxl_refiner_aesthetic(pipe: Any) -> tuple[float, float] | None:
    # StableDiffusionXLImg2ImgPipeline.__call__'s defaults.
    return (6.0, 2.5) if pipe.config.get("requires_aesthetics_score", False) else None


# SDXL's entry but for what the img2img pipeline with text_encoder None reads: CLIP-G alone,
# and time ids ending with an aesthetic score.
SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    class_name="StableDiffusionXLImg2ImgPipeline",
    text_encoders=("text_encoder_2",),
    tokenizers=("tokenizer_2",),
    _text_widths=_sdxl_refiner_text_widths,
    _tokenize=_sdxl_refiner_tokenize,
    _aesthetic=_sdxl_refiner_aesthetic,
    latents_of="sdxl",
)


# ---- SD 1.x / 2.x: one CLIP, AutoencoderKL, UNet (no pooled input, no size conditioning) --


def _sd_encode(pipe: Any, prompts: list[str], max_sequence_length: int) -> tuple[Any, None]:
    # CLIP only: max_sequence_length does not apply; nothing is pooled.
    prompt_embeds, _ = pipe.encode_prompt(
        prompts, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return prompt_embeds, None  # (B, 77, D)


def _sd_tokenize(pipe: Any, prompts: list[str], max_sequence_length: int) -> dict[str, np.ndarray]:
    return {"clip": _clip_tokens(pipe.tokenizer, prompts)}


def _sd_forward(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    guidance: torch.Tensor | None,
) -> torch.Tensor:
    """StableDiffusionPipeline's UNet call: the text states alone condition it."""
    return unet(latents, timestep, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


def _sd_text_widths(unet: Config) -> tuple[int, int | None]:
    return unet["cross_attention_dim"], None


# SDXL's UNet path without what SDXL added: the size conditioning and CLIP-G's pooled input.
SD = replace(
    SDXL,
    name="sd",
    class_name="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    _text_widths=_sd_text_widths,
    _encode=_sd_encode,
    _tokenize=_sd_tokenize,
    _forward=_sd_forward,
    size_conditioning=False,
    _zero_negative=_never,
)


# ---- Wan text-to-video: UMT5, AutoencoderKLWan, spacetime-patch DiT --------------------


def _wan_encode(
    pipe: WanPipeline, prompts: list[str], max_sequence_length: int
) -> tuple[torch.Tensor, None]:
    prompt_embeds, _ = pipe.encode_prompt(
        prompt=prompts,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, None  # (B, max_sequence_length, D); Wan pools nothing


def _wan_tokenize(
    pipe: WanPipeline, prompts: list[str], max_sequence_length: int
) -> dict[str, np.ndarray]:
    # Wan cleans the text (ftfy, whitespace) before its tokenizer sees it; its attention mask
    # is ids != pad_token_id.
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    cleaned = [prompt_clean(prompt) for prompt in prompts]
    return {"t5": pipe.tokenizer(cleaned, **_t5_tokens(max_sequence_length)).input_ids}


def _wan_text_widths(transformer: Config) -> tuple[int, int | None]:
    return transformer["text_dim"], None  # Wan pools nothing


def _wan_multiples(vae: Config, transformer: Config) -> Multiples:
    _, patch_height, patch_width = transformer["patch_size"]  # (t, h, w)
    assert patch_height == patch_width, "Wan patches are square"
    spatial = vae["scale_factor_spatial"]
    return Multiples(
        latent=spatial, size=spatial * patch_height, frames=vae["scale_factor_temporal"]
    )


WAN_T2V = Family(
    name="wan-t2v",
    class_name="WanPipeline",
    media="video",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    denoisers=("transformer", "transformer_2"),
    vae="vae",
    latents=ChannelStats(),
    _text_widths=_wan_text_widths,
    _encode=_wan_encode,
    _tokenize=_wan_tokenize,
    _multiples=_wan_multiples,
)


# ---- Wan image-to-video: Wan's text-to-video plus a CLIP vision encoder of the input image,
# and the VAE-encoded first frame (with its mask) concatenated to the noisy latents --------


def _wan_i2v_forward(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    condition: torch.Tensor,
) -> torch.Tensor:
    """WanImageToVideoPipeline's call: the first-frame condition (B, 4 + C, f, h, w) joins
    the latents' channels, the image's tokens (B, N, D) go beside the text's."""
    import torch

    return transformer(
        hidden_states=torch.cat([latents, condition.to(latents.dtype)], dim=1),
        timestep=timestep,
        encoder_hidden_states=prompt_embeds,
        encoder_hidden_states_image=image_embeds,
        return_dict=False,
    )[0]


def _wan_i2v_latent_channels(transformer: Config) -> int:
    # The transformer reads 16 noisy + 4 mask + 16 first-frame channels and predicts the 16.
    return transformer["out_channels"]


WAN_I2V = replace(
    WAN_T2V,
    name="wan-i2v",
    class_name="WanImageToVideoPipeline",
    _latent_channels=_wan_i2v_latent_channels,
    image_encoders=("image_encoder", "image_processor"),
)

# Keyed by the pipeline class model_index.json names.
FAMILIES: dict[str, Family] = {
    family.class_name: family for family in (SD3, FLUX, SDXL, SDXL_REFINER, SD, WAN_T2V, WAN_I2V)
}
