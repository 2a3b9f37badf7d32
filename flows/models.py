"""Tiny bundles of the real model classes, built offline with seeded random weights.

Each bundle is the folder `save_pretrained` writes (safetensors only), so plain diffusers and
transformers load it with `from_pretrained(dir)`, exactly like a published checkpoint of the
same family. Weights are random: a bundle exercises every code path (shapes, configs,
tokenizers, schedulers) at a size that builds in about a second and runs on a CPU.

Tokenizers are built from `CAPTION_WORDS` without any download: a byte-level BPE (CLIP), a
Unigram (T5 / UMT5) and a WordPiece (BERT, for BLIP), each wrapped in the transformers class
the real checkpoint uses. Image processors are built with transformers' PIL backend, named as
such (torchvision is not a dependency); the saved config names the backend-neutral class, so
a bundle loads with whichever backend the loading machine has.
"""

from __future__ import annotations

import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tokenizers import pre_tokenizers
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

TINY_BUNDLES: tuple[str, ...] = (
    "t2i",
    "flux",
    "flux-schnell",
    "sdxl",
    "sdxl-refiner",
    "sd",
    "refiner",
    "upscaler",
    "t2v",
    "i2v",
    "captioner",
    "scorer",
    "aesthetic",
    "nsfw",
)

# Lowercase ASCII only: byte-level BPE then sees each letter as itself, and every tokenizer
# below learns whole-word tokens for common caption words (anything else splits into pieces).
CAPTION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        """
        a an the of and with on in at by to from for near under over behind beside into through
        is are two three four five six many some small large big tiny huge tall short long old
        young new red orange yellow green blue purple pink brown black white gray grey golden
        silver dark bright light colorful pale vivid soft warm cold wet dry sunny cloudy rainy
        snowy foggy misty night day morning evening sunset sunrise dawn dusk summer winter autumn
        spring photo photograph picture image painting drawing sketch illustration render
        portrait landscape closeup close up view aerial wide shot detailed realistic cinematic
        dramatic beautiful cute happy sad smiling sitting standing walking running flying
        swimming eating drinking reading playing holding looking wearing riding jumping sleeping
        lying dancing singing cooking man woman boy girl child children baby people person family
        friends crowd couple cat cats dog dogs puppy kitten bird birds horse cow sheep fish lion
        tiger bear elephant monkey squirrel rabbit fox deer duck owl butterfly flower flowers tree
        trees forest grass leaf leaves garden park field farm mountain mountains hill hills river
        lake ocean sea beach sand wave waves water sky cloud clouds sun moon star stars rain snow
        ice fire smoke rock rocks stone desert island city town village street road bridge
        building buildings house home room kitchen table chair bed window door wall floor roof car
        cars bus train boat ship plane bicycle bike truck food burger pizza cake bread fruit apple
        banana coffee tea cup plate bowl glass bottle book books phone computer lamp clock mirror
        hat shirt dress coat shoes jacket glasses bag umbrella ball toy guitar piano art style oil
        canvas watercolor pencil digital anime cartoon vintage modern futuristic robot castle
        tower church temple market shop restaurant cafe lights neon reflection shadow background
        foreground center top bottom left right side front back against together alone empty full
        circle square triangle shape moving up down
        """.split()
    )
)


def build_tiny_bundles(
    out_dir: str | Path, names: Iterable[str] = TINY_BUNDLES, seed: int = 0
) -> dict[str, Path]:
    """Write each named tiny bundle to `out_dir/<name>` and return their folders.

    A bundle is built in a staging folder next to its destination and then renamed into
    place, so a reader never sees a half-written bundle and an existing one is replaced.
    The same `seed` gives byte-identical files.
    """
    names = tuple(names)
    unknown = [name for name in names if name not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown tiny bundle name(s) {unknown}; known: {list(TINY_BUNDLES)}")
    return {name: _write_bundle(Path(out_dir) / name, _BUILDERS[name], seed) for name in names}


def build_short_context_t2i(out: str | Path, clip_positions: int, seed: int = 0) -> Path:
    """The tiny t2i bundle with CLIP tokenizers and text encoders of ``clip_positions``
    positions instead of 77: for a domain of short captions (the shapes corpus) every
    transformer step attends over ``clip_positions`` + T5 tokens of text, not 77 + T5.
    StableDiffusion3Pipeline pads CLIP to its tokenizer's ``model_max_length``."""

    def build(staged: Path, seed: int) -> None:
        pipe = _sd3_pipeline(seed, transformer_seed=seed, clip_positions=clip_positions)
        pipe.save_pretrained(staged, safe_serialization=True)

    return _write_bundle(Path(out), build, seed)


def build_tiny_lora(
    bundle_dir: str | Path,
    out: str | Path,
    seed: int,
    rank: int = 4,
    heads: int | None = None,
) -> Path:
    """A LoRA on the bundle's SD3 transformer in diffusers' format (``save_lora_weights``, as
    ``raygen train`` exports one), on the attention projections, with seeded random
    matrices: peft starts B at zero, an identity no image could tell from the base. With
    ``heads``, made on a transformer of that many heads instead: an adapter for another base.
    """
    config = dict(SD3Transformer2DModel.load_config(Path(bundle_dir) / "transformer"))
    if heads is not None:
        config["num_attention_heads"] = heads
    with _seeded(seed):
        transformer = SD3Transformer2DModel.from_config(config)
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        )
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.3)
    StableDiffusion3Pipeline.save_lora_weights(
        out, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    return Path(out)


def _write_bundle(bundle_dir: Path, builder: Callable[[Path, int], None], seed: int) -> Path:
    """Build in a staging folder next to ``bundle_dir``, then rename into place."""
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{bundle_dir.name}-", dir=bundle_dir.parent) as tmp:
        staged = Path(tmp) / bundle_dir.name
        builder(staged, seed)
        if bundle_dir.exists():
            # Move the old bundle into staging so the context manager deletes it.
            bundle_dir.rename(Path(tmp) / "replaced")
        staged.rename(bundle_dir)
    return bundle_dir


# ---------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------


def _build_t2i(out: Path, seed: int) -> None:
    _sd3_pipeline(seed, transformer_seed=seed).save_pretrained(out, safe_serialization=True)


def _build_refiner(out: Path, seed: int) -> None:
    # Same text encoders and VAE as `t2i` (one shared text-encoder stage, one latent space
    # for the handoff); only the transformer's weights differ (seeded like t2i's at seed + 1).
    _sd3_pipeline(seed, transformer_seed=seed + 1).save_pretrained(out, safe_serialization=True)


def _build_flux(out: Path, seed: int) -> None:
    _flux_pipeline(seed, guidance_embeds=True).save_pretrained(out, safe_serialization=True)


def _build_flux_schnell(out: Path, seed: int) -> None:
    _flux_pipeline(seed, guidance_embeds=False).save_pretrained(out, safe_serialization=True)


def _build_sdxl(out: Path, seed: int) -> None:
    """SDXL base at toy width: CLIP-L and CLIP-G (with projection; its pooled output and the
    six size/crop time ids are the UNet's added conditioning), a two-level UNet, SDXL's VAE
    factor and its Euler scheduler."""
    tokenizer = _clip_tokenizer()
    text_encoder = _clip_l(tokenizer, seed)
    text_encoder_2 = _sdxl_clip_g(tokenizer, seed)
    # Both CLIPs' penultimate states side by side, as SDXL's 768 + 1280 = 2048.
    width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    StableDiffusionXLPipeline(
        vae=_sdxl_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_unet(seed, width, (text_encoder_2.config.projection_dim, 6)),
        scheduler=_sdxl_scheduler(),
    ).save_pretrained(out, safe_serialization=True)


def _build_sdxl_refiner(out: Path, seed: int) -> None:
    """SDXL's refiner at the toy width of `sdxl`: CLIP-G alone (the base's, file for file, as
    the published refiner's is), the base's VAE (one latent space for the handoff), a UNet of
    its own weights reading five time ids (sizes, crop and an aesthetic score)."""
    tokenizer = _clip_tokenizer()
    text_encoder_2 = _sdxl_clip_g(tokenizer, seed)
    unet = _unet(
        seed + 1, text_encoder_2.config.hidden_size, (text_encoder_2.config.projection_dim, 5)
    )
    StableDiffusionXLImg2ImgPipeline(
        vae=_sdxl_vae(seed),
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_sdxl_scheduler(),
        # stabilityai/stable-diffusion-xl-refiner-1.0's pipeline config.
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    ).save_pretrained(out, safe_serialization=True)


def _build_sd(out: Path, seed: int) -> None:
    """Stable Diffusion 1.x at toy width: one CLIP text encoder (its last states, nothing
    pooled), a two-level UNet without added conditioning, SD's VAE factor and its PNDM
    scheduler; no safety checker (the serve graph has its own stage)."""
    tokenizer = _clip_tokenizer()
    text_encoder = _clip_l(tokenizer, seed)
    unet = _unet(seed, text_encoder.config.hidden_size)
    with _seeded(seed):
        vae = _vae_8x(latent_channels=4, scaling_factor=0.18215)
    # stable-diffusion-v1-5's scheduler config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(out, safe_serialization=True)


def _sdxl_clip_g(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    with _seeded(seed):
        return CLIPTextModelWithProjection(
            _clip_text_config(tokenizer, hidden_size=48, hidden_act="gelu")
        )


def _clip_l(tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    with _seeded(seed):
        return CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu"))


def _unet(
    seed: int, cross_attention_dim: int, added: tuple[int, int] | None = None
) -> UNet2DConditionModel:
    """The SD-family UNet at toy width; ``added``: SDXL's (pooled width, number of time ids)
    as its added conditioning, None for SD 1.x/2.x's UNet without."""
    time_dim = 8  # SDXL's addition_time_embed_dim is 256
    conditioning = {}
    if added is not None:
        pooled_dim, time_ids = added
        conditioning = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": pooled_dim + time_ids * time_dim,
        }
    with _seeded(seed):
        return UNet2DConditionModel(
            sample_size=4,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=cross_attention_dim,
            **conditioning,
        )


def _sdxl_vae(seed: int) -> AutoencoderKL:
    with _seeded(seed):
        # SDXL's VAE: 4 latent channels, quant convs, its scaling factor, no shift.
        return _vae_8x(latent_channels=4, scaling_factor=0.13025)


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    # stabilityai/stable-diffusion-xl-base-1.0's scheduler config (the refiner's is the same).
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _build_upscaler(out: Path, seed: int) -> None:
    tokenizer = _clip_tokenizer()
    with _seeded(seed):
        text_encoder = CLIPTextModel(
            _clip_text_config(tokenizer, hidden_size=32, hidden_act="gelu")
        )
    with _seeded(seed):
        # x4 upscaler layout at toy width: the low-res RGB image is concatenated to the 4 latent
        # channels (in_channels=7) and the noise level enters as a class label (1000 classes,
        # as in stabilityai/stable-diffusion-x4-upscaler). Two levels keep one cross-attention
        # block; groups of 8 divide both widths.
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=7,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=8,
            use_linear_projection=True,
            num_class_embeds=1000,
        )
    with _seeded(seed):
        # Three levels give the family's 4x latent downscale; 0.08333 is its scaling factor.
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.08333,
        )
    # Schedulers as the x4 upscaler ships them: v-prediction DDIM for denoising, DDPM to noise
    # the low-res conditioning image.
    noise_schedule = {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02}
    pipeline = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=DDPMScheduler(**noise_schedule, clip_sample=False),
        scheduler=DDIMScheduler(
            **noise_schedule,
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        max_noise_level=350,
    )
    pipeline.save_pretrained(out, safe_serialization=True)


def _wan_components(seed: int, image_dim: int | None = None) -> dict[str, Any]:
    """A tiny Wan 2.1's components; with ``image_dim``, its image-to-video transformer: 16 noisy
    + 4 mask + 16 first-frame latent channels in, 16 out, and image tokens of that width."""
    tokenizer = _t5_tokenizer(model_max_length=512)
    with _seeded(seed):
        # UMT5 like Wan's umt5-xxl encoder, at d_model 32 instead of 4096.
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                num_heads=4,
                d_ff=64,
                num_layers=2,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    with _seeded(seed):
        # Wan 2.1 layout: (1, 2, 2) spacetime patches over 16 latent channels. A head dim of 12
        # splits evenly into the 3D RoPE's time/height/width parts (4 each).
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16 if image_dim is None else 36,
            out_channels=16,
            text_dim=text_encoder.config.d_model,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=32,
            image_dim=image_dim,
        )
    with _seeded(seed):
        # Wan's causal video VAE with the real 8x spatial / 4x temporal downscale (three
        # downsamples, the last two temporal) and its latents_mean/std defaults; width 8.
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    # The scheduler Wan 2.1 ships: UniPC on flow-matching sigmas, shift 3.0 (its 480p value).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "transformer": transformer,
    }


def _build_t2v(out: Path, seed: int) -> None:
    WanPipeline(**_wan_components(seed)).save_pretrained(out, safe_serialization=True)


def _build_i2v(out: Path, seed: int) -> None:
    # Wan 2.1 I2V reads a CLIP ViT's second-to-last hidden states (ViT-H/14 at 224 px there,
    # 1280 wide; here 32 px in 8 px patches, 16 wide: 17 tokens).
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    with _seeded(seed):
        image_encoder = CLIPVisionModel(vision)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    pipeline = WanImageToVideoPipeline(
        **_wan_components(seed, image_dim=vision.hidden_size),
        image_encoder=image_encoder,
        image_processor=processor,
    )
    pipeline.save_pretrained(out, safe_serialization=True)


def _build_captioner(out: Path, seed: int) -> None:
    tokenizer = _bert_tokenizer()
    # Vision: 32x32 images in 8x8 patches, 16 tokens for the decoder to cross-attend.
    vision_config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    # BLIP's decoder starts from [DEC] and stops at [SEP], as Salesforce/blip-* do.
    text_config = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_hidden_size=vision_config.hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = BlipForConditionalGeneration(
            BlipConfig(
                vision_config=vision_config.to_dict(),
                text_config=text_config.to_dict(),
                projection_dim=32,
                image_text_hidden_size=32,
            )
        )
    processor = BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def _build_scorer(out: Path, seed: int) -> None:
    tokenizer = _clip_tokenizer()
    text_config = _clip_text_config(tokenizer, hidden_size=32, hidden_act="quick_gelu")
    # 32x32 images in 8x8 patches: 16 patch tokens plus the class token.
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    with _seeded(seed):
        model = CLIPModel(
            CLIPConfig(
                text_config=text_config.to_dict(),
                vision_config=vision_config.to_dict(),
                projection_dim=32,
            )
        )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def _build_aesthetic(out: Path, seed: int) -> None:
    # One regression output, the shape of LAION-style aesthetic predictors: a score per image.
    _save_image_classifier(
        out, seed, ViTConfig(**_TINY_VIT, num_labels=1, problem_type="regression")
    )


def _build_nsfw(out: Path, seed: int) -> None:
    # Labels as Falconsai/nsfw_image_detection names them; filters read the "nsfw" probability.
    labels = {0: "normal", 1: "nsfw"}
    config = ViTConfig(
        **_TINY_VIT,
        id2label=labels,
        label2id={label: index for index, label in labels.items()},
        problem_type="single_label_classification",
    )
    _save_image_classifier(out, seed, config)


# 32x32 images in 8x8 patches: 16 patch tokens plus the class token, like the scorer's tower.
_TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}


def _save_image_classifier(out: Path, seed: int, config: ViTConfig) -> None:
    with _seeded(seed):
        model = ViTForImageClassification(config)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path, int], None]] = {
    "t2i": _build_t2i,
    "flux": _build_flux,
    "flux-schnell": _build_flux_schnell,
    "sdxl": _build_sdxl,
    "sdxl-refiner": _build_sdxl_refiner,
    "sd": _build_sd,
    "refiner": _build_refiner,
    "upscaler": _build_upscaler,
    "t2v": _build_t2v,
    "i2v": _build_i2v,
    "captioner": _build_captioner,
    "scorer": _build_scorer,
    "aesthetic": _build_aesthetic,
    "nsfw": _build_nsfw,
}
assert set(_BUILDERS) == set(TINY_BUNDLES)


# ---------------------------------------------------------------------------------------
# Shared parts
# ---------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed weight init without changing the caller's global RNG state, on one thread: a
    sin/cos table computed across threads can differ in its last bit with how the work was
    split (SD3's position embedding did, in about one build of five)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _sd3_pipeline(
    seed: int, transformer_seed: int, clip_positions: int = 77
) -> StableDiffusion3Pipeline:
    clip_tokenizer = _clip_tokenizer(clip_positions)
    t5_tokenizer = _t5_tokenizer(model_max_length=512)
    # Two CLIP encoders of different widths (like SD3's CLIP-L 768 and CLIP-G 1280) so code
    # that mixes them up fails on shapes.
    with _seeded(seed):
        text_encoder = CLIPTextModelWithProjection(
            _clip_text_config(clip_tokenizer, hidden_size=32, hidden_act="quick_gelu")
        )
    with _seeded(seed):
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(clip_tokenizer, hidden_size=48, hidden_act="gelu")
        )
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size  # 80
    with _seeded(seed):
        # T5 v1.1 style (gated-gelu). d_model 96 exceeds the 80 concatenated CLIP channels, so
        # the pipeline's zero-padding of CLIP embeddings to the joint width is exercised.
        text_encoder_3 = _t5_encoder(t5_tokenizer, d_model=96, d_kv=16, d_ff=128)
    with _seeded(transformer_seed):
        # MMDiT with SD3's patch size 2 over 16 latent channels. sample_size 4 (latent) makes
        # the default output 32x32 px; pos_embed_max_size 32 allows latents up to 64x64.
        transformer = SD3Transformer2DModel(
            sample_size=4,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=text_encoder_3.config.d_model,
            pooled_projection_dim=clip_width,
            pos_embed_max_size=32,
        )
    with _seeded(seed):
        # SD3's VAE: 16 latent channels, no quant convs, its scaling/shift factors.
        vae = _vae_8x(
            latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False
        )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )


def _flux_pipeline(seed: int, guidance_embeds: bool) -> FluxPipeline:
    """Flux at toy width: FLUX.1-dev's layout (``guidance_embeds``: the guidance scale is an
    input of the transformer) or FLUX.1-schnell's (no guidance, a fixed-shift scheduler)."""
    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer(model_max_length=512)
    with _seeded(seed):
        # Flux reads CLIP-L's pooled output only (CLIPTextModel, no projection).
        text_encoder = CLIPTextModel(
            _clip_text_config(clip_tokenizer, hidden_size=32, hidden_act="quick_gelu")
        )
    with _seeded(seed):
        text_encoder_2 = _t5_encoder(t5_tokenizer, d_model=48, d_kv=12, d_ff=96)
    with _seeded(seed):
        # One double-stream and one single-stream block; 2x2 packed patches of 16 latent
        # channels (in_channels 64, patch_size 1 as in the published configs). The RoPE axes
        # (text/row, row, column) add up to the head dim, as Flux's 16 + 56 + 56 = 128 do.
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    with _seeded(seed):
        # Flux's VAE: 16 latent channels, no quant convs, its factors.
        vae = _vae_8x(
            latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False
        )
    # The schedulers the two checkpoints ship: dev shifts with the image's token count,
    # schnell samples its few steps unshifted.
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def _vae_8x(
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None = None,
    quant_convs: bool = True,
) -> AutoencoderKL:
    """The image families' AutoencoderKL at toy width: four levels (8x downscale, as SD3's,
    Flux's and SDXL's), widths 8..32 in groups of 8, with the family's latent channels,
    factors and quant convs (SD3 and Flux dropped them)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def _t5_encoder(tokenizer: T5Tokenizer, d_model: int, d_kv: int, d_ff: int) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated-gelu, two layers, four heads) at toy width."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=d_kv,
            num_heads=4,
            d_ff=d_ff,
            num_layers=2,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _clip_text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str
) -> CLIPTextConfig:
    # Two layers because SD3 reads the penultimate hidden state; the real eos id (not the
    # legacy 2) makes CLIP pool at the first end-of-text token.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's byte-level BPE: vocab laid out as CLIP's (bytes, bytes + "</w>", merges, specials).
    77 positions by default, as every CLIP text encoder the pipelines pad to."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _bpe_merges()
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


@cache
def _bpe_merges() -> tuple[tuple[str, str], ...]:
    """Learn BPE merges on `CAPTION_WORDS` until every word is one token.

    Hand-rolled rather than `tokenizers.trainers.BpeTrainer`, whose tie-breaking between
    equally frequent pairs changes from process to process; here ties go to the smallest pair.
    """
    words = [[*word[:-1], word[-1] + "</w>"] for word in CAPTION_WORDS]
    merges = []
    while pair_counts := Counter(pair for word in words for pair in pairwise(word)):
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        words = [_merge_pair(word, best) for word in words]
    return tuple(merges)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    for symbol in symbols:
        if merged and (merged[-1], symbol) == pair:
            merged[-1] += symbol
        else:
            merged.append(symbol)
    return merged


def _t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """A SentencePiece-style Unigram vocab: whole caption words, then single characters.

    Scores favour one word piece over spelling a word out; characters outside the vocab map
    to <unk>. No sentinel (<extra_id_*>) tokens: only T5's denoising pretraining uses them.
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + word, -8.0) for word in CAPTION_WORDS]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _bert_tokenizer() -> BertTokenizer:
    """BLIP's BERT WordPiece: specials, characters (word-initial and ##continuation), words,
    and BLIP's [DEC] decoder-start token."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [*chars, *("##" + char for char in chars), *CAPTION_WORDS, "[DEC]"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
