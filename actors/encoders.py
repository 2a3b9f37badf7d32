"""Encode once, train many times: captions through the bundle's text encoders, pixels
through its VAE, each with the diffusers pipeline's own code so training sees exactly what
the pipeline would have computed.

Images use ``PrepConfig.bundle`` (an SD3 bundle: two CLIP encoders + T5, AutoencoderKL);
videos use ``PrepConfig.video_bundle`` (a Wan bundle: UMT5, AutoencoderKLWan). Only the
components a stage needs are loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan, StableDiffusion3Pipeline, WanPipeline
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from actors.batches import (
    empty_tensor,
    media_rows,
    num_rows,
    object_column,
    ok_rows,
    pixel_groups,
    row_frames,
)
from actors.loaders import load_component_config, load_pipeline
from schemas.config import EncodeConfig, ModelRef, PrepConfig, StorageConfig
from schemas.shards import (
    CAPTION,
    CAPTION_KINDS,
    INPUT_IDS,
    LATENT_MEAN,
    LATENT_STD,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    BucketKey,
)

# Components each pipeline's text encoding never touches.
_NOT_TEXT = {
    StableDiffusion3Pipeline: ("transformer", "vae"),
    WanPipeline: ("transformer", "transformer_2", "vae"),
}
_TEXT_ENCODERS = {
    StableDiffusion3Pipeline: ("text_encoder", "text_encoder_2", "text_encoder_3"),
    WanPipeline: ("text_encoder",),
}
# Everything but the VAE (and the scheduler, which holds no weights).
_NOT_VAE = {
    StableDiffusion3Pipeline: (
        "transformer",
        *_TEXT_ENCODERS[StableDiffusion3Pipeline],
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ),
    WanPipeline: ("transformer", "transformer_2", "text_encoder", "tokenizer"),
}


def _pipeline(
    ref: ModelRef, storage: StorageConfig, pipeline_cls: type, drop: tuple[str, ...]
) -> Any:
    pipe = load_pipeline(ref, storage, pipeline_cls, **dict.fromkeys(drop))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


class TextEncoder:
    """Encodes ``caption_original`` and ``caption_synthetic`` of every ok row.

    ``encode.text == "embeddings"`` adds, for kind in ("original", "synthetic"):

    - ``prompt_embeds_{kind}``: float32 (L, D). Images: ``StableDiffusion3Pipeline
      .encode_prompt`` without classifier-free guidance, L = 77 CLIP positions +
      ``encode.max_sequence_length`` T5 positions. Videos: ``WanPipeline.encode_prompt``,
      L = ``encode.max_sequence_length``.
    - ``pooled_prompt_embeds_{kind}``: float32 (D,), the two CLIP encoders' pooled outputs
      (images only; Wan has none).

    ``encode.text == "tokens"`` loads only the tokenizers and adds ``input_ids_{kind}``: per
    row a ``dict[str, np.ndarray]`` of int32 token ids per text encoder, ``"clip_l"``,
    ``"clip_g"``, ``"t5"`` for images and ``"t5"`` (Wan's UMT5) for videos, padded and
    truncated exactly as the pipeline feeds its encoders (Wan's attention mask is
    ``ids != tokenizer.pad_token_id``). Ray Data turns the column into an Arrow struct of
    int32 lists (keys a row lacks read back as None).

    A missing caption or a row that is not ok gets empty values: ``(0, 0)`` and ``(0,)``
    float32 arrays, or None for token ids.
    """

    def __init__(
        self,
        config: EncodeConfig,
        bundle: ModelRef,
        video_bundle: ModelRef | None,
        storage: StorageConfig,
    ) -> None:
        self.tokens_only = config.text == "tokens"
        self.max_sequence_length = config.max_sequence_length
        self.pipes: dict[str, Any] = {}
        for kind, ref, pipeline_cls in (
            ("image", bundle, StableDiffusion3Pipeline),
            ("video", video_bundle, WanPipeline),
        ):
            if ref is None:
                continue
            drop = _NOT_TEXT[pipeline_cls]
            if self.tokens_only:
                drop += _TEXT_ENCODERS[pipeline_cls]
            self.pipes[kind] = _pipeline(ref, storage, pipeline_cls, drop)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = num_rows(batch)
        if self.tokens_only:
            columns: dict[str, list[Any]] = {
                INPUT_IDS[kind]: [None] * n for kind in CAPTION_KINDS
            }
        else:
            columns = {}
            for kind in CAPTION_KINDS:
                columns[PROMPT_EMBEDS[kind]] = [empty_tensor(2) for _ in range(n)]
                columns[POOLED_PROMPT_EMBEDS[kind]] = [empty_tensor(1) for _ in range(n)]

        for media, rows in media_rows(batch, ok_rows(batch)).items():
            if media not in self.pipes:
                raise ValueError(
                    f"{batch['sample_id'][rows[0]]}: a video row but config.video_bundle is null"
                )
            # Both captions of every row of this media kind in one encoder call.
            targets = [
                (kind, index)
                for kind in CAPTION_KINDS
                for index in rows
                if batch[CAPTION[kind]][index] is not None
            ]
            if not targets:
                continue
            prompts = [str(batch[CAPTION[kind]][index]) for kind, index in targets]
            if self.tokens_only:
                for (kind, index), ids in zip(targets, self._tokens(media, prompts), strict=True):
                    columns[INPUT_IDS[kind]][index] = ids
            else:
                prompt_embeds, pooled = self._embeddings(media, prompts)
                for position, (kind, index) in enumerate(targets):
                    columns[PROMPT_EMBEDS[kind]][index] = prompt_embeds[position]
                    if pooled is not None:
                        columns[POOLED_PROMPT_EMBEDS[kind]][index] = pooled[position]

        return {**batch, **{name: object_column(values) for name, values in columns.items()}}

    def _embeddings(self, media: str, prompts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, L, D) sequence embeddings and (B, D) pooled ones (None for Wan)."""
        pipe = self.pipes[media]
        with torch.inference_mode():
            if media == "image":
                prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    prompt_3=None,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
                return _numpy(prompt_embeds), _numpy(pooled)
            prompt_embeds, _ = pipe.encode_prompt(
                prompt=prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
            return _numpy(prompt_embeds), None

    def _tokens(self, media: str, prompts: list[str]) -> list[dict[str, np.ndarray]]:
        """Token ids per encoder, tokenized with the arguments the pipeline's own
        ``_get_clip_prompt_embeds`` / ``_get_t5_prompt_embeds`` use."""
        pipe = self.pipes[media]
        t5 = {
            "padding": "max_length",
            "max_length": self.max_sequence_length,
            "truncation": True,
            "add_special_tokens": True,
            "return_tensors": "np",
        }
        if media == "image":
            clip = {
                "padding": "max_length",
                "max_length": pipe.tokenizer_max_length,
                "truncation": True,
                "return_tensors": "np",
            }
            ids = {
                "clip_l": pipe.tokenizer(prompts, **clip).input_ids,
                "clip_g": pipe.tokenizer_2(prompts, **clip).input_ids,
                "t5": pipe.tokenizer_3(prompts, **t5).input_ids,
            }  # (B, L) each
        else:
            # Wan cleans the text (ftfy, whitespace) before its tokenizer sees it.
            ids = {"t5": pipe.tokenizer([prompt_clean(p) for p in prompts], **t5).input_ids}
        return [
            {name: values[position].astype(np.int32) for name, values in ids.items()}
            for position in range(len(prompts))
        ]


def empty_prompt_embeddings(config: PrepConfig) -> dict[str, np.ndarray]:
    """Embeddings of the empty prompt "", which training swaps in for classifier-free-guidance
    dropout: ``image_prompt_embeds`` (L, D) and ``image_pooled_prompt_embeds`` (D,) from the
    image bundle, ``video_prompt_embeds`` (L, D) from the video bundle when there is one.
    Float32, encoded like ``TextEncoder``'s embeddings whatever ``encode.text`` says."""
    encode = config.encode.model_copy(update={"text": "embeddings"})
    encoder = TextEncoder(encode, config.bundle, config.video_bundle, config.storage)
    prompt_embeds, pooled = encoder._embeddings("image", [""])
    embeddings = {"image_prompt_embeds": prompt_embeds[0], "image_pooled_prompt_embeds": pooled[0]}
    if "video" in encoder.pipes:
        embeddings["video_prompt_embeds"] = encoder._embeddings("video", [""])[0][0]
    return embeddings


class LatentEncoder:
    """Encodes the pixels of every ok row with the bundle's VAE.

    Images: AutoencoderKL on (B, 3, H, W); videos: AutoencoderKLWan on (B, 3, F, H, W); both
    preprocessed by the pipeline's own VaeImageProcessor / VideoProcessor (uint8 -> [0, 1]
    as its PIL path does, then [-1, 1]). Rows of one media kind and pixel shape are encoded
    as one batch. Adds float32 ``latent_mean`` = ``latent_dist.mean`` and, with
    ``encode.latent_std``, ``latent_std`` = ``latent_dist.std``, both (C, f, h, w): an image
    is one frame (f = 1), as its pixels are. Ray Data keeps a tensor column only while every
    row has the same ndim (mixed ndims become pickled objects that no longer concatenate), so
    images and clips share one ndim in flight; the shard writer drops the image's frame axis.
    Latents are NOT scaled: ``vae_factors`` gives the factors training applies. Rows that are
    not ok get empty (0, 0, 0, 0) arrays.
    """

    def __init__(
        self,
        config: EncodeConfig,
        bundle: ModelRef,
        video_bundle: ModelRef | None,
        storage: StorageConfig,
    ) -> None:
        self.latent_std = config.latent_std
        self.pipes: dict[str, Any] = {}
        for kind, ref, pipeline_cls in (
            ("image", bundle, StableDiffusion3Pipeline),
            ("video", video_bundle, WanPipeline),
        ):
            if ref is not None:
                self.pipes[kind] = _pipeline(ref, storage, pipeline_cls, _NOT_VAE[pipeline_cls])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = [str(kind) for kind in batch["media_kind"]]
        columns = {LATENT_MEAN: [empty_tensor(4) for _ in kinds]}  # (C, f, h, w)
        if self.latent_std:
            columns[LATENT_STD] = [empty_tensor(4) for _ in kinds]

        for (media, _), rows in pixel_groups(batch, ok_rows(batch)).items():
            if media not in self.pipes:
                raise ValueError(
                    f"{batch['sample_id'][rows[0]]}: a video row but config.video_bundle is null"
                )
            frames = np.stack([row_frames(batch, index) for index in rows])  # (B, F, H, W, 3)
            with torch.inference_mode():
                if media == "image":
                    latent_dist = self._encode_images(frames[:, 0])
                    mean = _numpy(latent_dist.mean)[:, :, None]  # (B, C, 1, h, w)
                    std = _numpy(latent_dist.std)[:, :, None] if self.latent_std else None
                else:
                    latent_dist = self._encode_videos(frames)
                    mean = _numpy(latent_dist.mean)  # (B, C, f, h, w)
                    std = _numpy(latent_dist.std) if self.latent_std else None
            for position, index in enumerate(rows):
                columns[LATENT_MEAN][index] = mean[position]
                if std is not None:
                    columns[LATENT_STD][index] = std[position]

        return {**batch, **{name: object_column(values) for name, values in columns.items()}}

    def _encode_images(self, pixels: np.ndarray) -> Any:
        pipe = self.pipes["image"]
        height, width = pixels.shape[1:3]  # pixels: (B, H, W, 3) uint8
        if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
            # The processor would silently resize; the bucket is wrong for this VAE instead.
            raise ValueError(
                f"image bucket {BucketKey(height, width)}: sides must be multiples of the VAE's "
                f"downscale {pipe.vae_scale_factor} (see buckets.step)"
            )
        image = pipe.image_processor.preprocess(pixels.astype(np.float32) / 255)  # (B, 3, H, W)
        image = image.to(pipe.vae.device, pipe.vae.dtype)
        return pipe.vae.encode(image).latent_dist

    def _encode_videos(self, pixels: np.ndarray) -> Any:
        pipe = self.pipes["video"]
        num_frames, height, width = pixels.shape[1:4]  # pixels: (B, F, H, W, 3) uint8
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        if height % spatial or width % spatial or (num_frames - 1) % temporal:
            raise ValueError(
                f"video bucket {BucketKey(height, width, num_frames)}: the video VAE needs sides "
                f"that are multiples of {spatial} and {temporal}k+1 frames "
                f"(see decode.video_num_frames)"
            )
        video = pipe.video_processor.preprocess_video(pixels.astype(np.float32) / 255)
        video = video.to(pipe.vae.device, pipe.vae.dtype)  # (B, 3, F, H, W)
        return pipe.vae.encode(video).latent_dist


def vae_factors(config: PrepConfig) -> dict[str, dict[str, Any]]:
    """The factors training applies to the stored (unscaled) latents, read from each VAE's
    config without loading weights:

    - ``"image"``: ``scaling_factor``, ``shift_factor``; training uses
      ``(latent_mean - shift_factor) * scaling_factor``.
    - ``"video"`` (when ``video_bundle`` is set): Wan's per-channel ``latents_mean`` and
      ``latents_std``; training uses ``(latent_mean - latents_mean) / latents_std``.
    """
    image = load_component_config(config.bundle, AutoencoderKL, config.storage, "vae")
    # VAE configs older than SD3's have no shift_factor key: they shift by nothing.
    factors: dict[str, dict[str, Any]] = {
        "image": {
            "scaling_factor": image["scaling_factor"],
            "shift_factor": image.get("shift_factor"),
        }
    }
    if config.video_bundle is not None:
        video = load_component_config(config.video_bundle, AutoencoderKLWan, config.storage, "vae")
        factors["video"] = {
            "latents_mean": video["latents_mean"],
            "latents_std": video["latents_std"],
        }
    return factors
