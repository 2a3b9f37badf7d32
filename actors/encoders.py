"""Encode once, train many times: captions through the bundle's text encoders, pixels
through its VAE, each with the diffusers pipeline's own code so training sees exactly what
the pipeline would have computed.

Images use ``PrepConfig.bundle`` (an image family's bundle, SD3: two CLIP encoders + T5,
AutoencoderKL); videos use ``PrepConfig.video_bundle`` (a video family's, Wan: UMT5,
AutoencoderKLWan). What each family loads, encodes and scales is ``actors/families.py``'s;
only the components a stage needs are loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from actors.batches import (
    empty_tensor,
    media_rows,
    num_rows,
    object_column,
    ok_rows,
    pixel_groups,
    row_frames,
)
from actors.families import Family, Multiples, component_config, family_of
from actors.loaders import load_pipeline
from actors.video import VideoImageEncoder
from cluster.bundles import resolve_bundle
from cluster.storage import Storage
from schemas.config import EncodeConfig, ModelRef, PrepConfig, StorageConfig
from schemas.shards import (
    CAPTION,
    CAPTION_KINDS,
    IMAGE_CONDITION,
    IMAGE_EMBEDS,
    INPUT_IDS,
    LATENT_MEAN,
    LATENT_STD,
    POOLED_PROMPT_EMBEDS,
    PROMPT_EMBEDS,
    BucketKey,
)


def _families(
    bundle: ModelRef, video_bundle: ModelRef | None, storage: StorageConfig
) -> dict[str, tuple[ModelRef, Family]]:
    """Per media kind, the bundle that encodes it and the bundle's family."""
    refs = {"image": bundle, "video": video_bundle}
    return {
        media: (ref, family_of(ref.uri, Storage(storage), media=media))
        for media, ref in refs.items()
        if ref is not None
    }


def _pipeline(ref: ModelRef, storage: StorageConfig, family: Family, *keep: str) -> Any:
    """The family's pipeline with only the ``keep`` component groups loaded."""
    pipe = load_pipeline(ref, storage, family.pipeline, **family.unloaded(*keep))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()


class TextEncoder:
    """Encodes ``caption_original`` and ``caption_synthetic`` of every ok row.

    ``encode.text == "embeddings"`` adds, for kind in ("original", "synthetic"):

    - ``prompt_embeds_{kind}``: float32 (L, D), the family's ``encode_prompt`` without
      classifier-free guidance. SD3: L = 77 CLIP positions + ``encode.max_sequence_length``
      T5 positions; Wan: L = ``encode.max_sequence_length``.
    - ``pooled_prompt_embeds_{kind}``: float32 (D,), for families that pool (SD3: the two
      CLIP encoders' pooled outputs; Wan has none).

    ``encode.text == "tokens"`` loads only the tokenizers and adds ``input_ids_{kind}``: per
    row a ``dict[str, np.ndarray]`` of int32 token ids per text encoder (the family's
    ``tokenize``: ``"clip_l"``, ``"clip_g"``, ``"t5"`` for SD3, ``"t5"`` (UMT5) for Wan),
    padded and truncated exactly as the pipeline feeds its encoders. Ray Data turns the
    column into an Arrow struct of int32 lists (keys a row lacks read back as None).

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
        keep = ("tokenizers",) if self.tokens_only else ("text_encoders", "tokenizers")
        self.families: dict[str, Family] = {}
        self.pipes: dict[str, Any] = {}
        for media, (ref, family) in _families(bundle, video_bundle, storage).items():
            self.families[media] = family
            self.pipes[media] = _pipeline(ref, storage, family, *keep)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = num_rows(batch)
        if self.tokens_only:
            columns: dict[str, list[Any]] = {INPUT_IDS[kind]: [None] * n for kind in CAPTION_KINDS}
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
        prompt_embeds, pooled = self.families[media].encode_prompt(
            self.pipes[media], prompts, self.max_sequence_length
        )
        return _numpy(prompt_embeds), None if pooled is None else _numpy(pooled)

    def _tokens(self, media: str, prompts: list[str]) -> list[dict[str, np.ndarray]]:
        """Token ids per encoder, one dict per prompt."""
        family = self.families[media]
        ids = family.tokenize(self.pipes[media], prompts, self.max_sequence_length)  # (B, L) each
        return [
            {name: values[position].astype(np.int32) for name, values in ids.items()}
            for position in range(len(prompts))
        ]


def empty_prompt_embeddings(config: PrepConfig) -> dict[str, np.ndarray]:
    """Embeddings of the empty prompt "", which training swaps in for classifier-free-guidance
    dropout, per media kind with a bundle: ``{media}_prompt_embeds`` (L, D) and, for a family
    that pools (SD3), ``{media}_pooled_prompt_embeds`` (D,). Float32, encoded like
    ``TextEncoder``'s embeddings whatever ``encode.text`` says."""
    return {key: value[0] for key, value in prompt_embeddings(config, [""]).items()}


def prompt_embeddings(config: PrepConfig, prompts: list[str]) -> dict[str, np.ndarray]:
    """``prompts`` encoded as prep encodes captions, per media kind with a bundle:
    ``{media}_prompt_embeds`` (P, L, D) and, for a family that pools,
    ``{media}_pooled_prompt_embeds`` (P, D)."""
    encode = config.encode.model_copy(update={"text": "embeddings"})
    encoder = TextEncoder(encode, config.bundle, config.video_bundle, config.storage)
    embeddings = {}
    for media in encoder.pipes:
        prompt_embeds, pooled = encoder._embeddings(media, prompts)
        embeddings[f"{media}_prompt_embeds"] = prompt_embeds
        if pooled is not None:
            embeddings[f"{media}_pooled_prompt_embeds"] = pooled
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

    An image-to-video video bundle (Wan i2v) also gives each clip's first frame as its
    pipeline prepares an input image (``actors/video.py``'s VideoImageEncoder, on this
    encoder's VAE): ``image_embeds`` (N, D), the image encoder's tokens, and
    ``image_condition`` (4 + C, f, h, w), the first-frame mask and normalised latents.
    """

    def __init__(
        self,
        config: EncodeConfig,
        bundle: ModelRef,
        video_bundle: ModelRef | None,
        storage: StorageConfig,
    ) -> None:
        self.latent_std = config.latent_std
        self.multiples: dict[str, Multiples] = {}
        self.pipes: dict[str, Any] = {}
        self.image_encoder: VideoImageEncoder | None = None
        for media, (ref, family) in _families(bundle, video_bundle, storage).items():
            self.multiples[media] = family.multiples(ref.uri, Storage(storage))
            if family.conditions_on_image:
                # Image-to-video: each clip's first frame as the pipeline prepares its input
                # image, with the same VAE.
                self.pipes[media] = _pipeline(ref, storage, family, "vae", "image_encoders")
                local = resolve_bundle(ref.uri, Storage(storage))
                self.image_encoder = VideoImageEncoder(
                    local, ref.device, self.pipes[media].vae.dtype, pipe=self.pipes[media]
                )
            else:
                self.pipes[media] = _pipeline(ref, storage, family, "vae")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = [str(kind) for kind in batch["media_kind"]]
        columns = {LATENT_MEAN: [empty_tensor(4) for _ in kinds]}  # (C, f, h, w)
        if self.latent_std:
            columns[LATENT_STD] = [empty_tensor(4) for _ in kinds]
        if self.image_encoder is not None:
            columns[IMAGE_EMBEDS] = [empty_tensor(2) for _ in kinds]  # (N, D)
            columns[IMAGE_CONDITION] = [empty_tensor(4) for _ in kinds]  # (4 + C, f, h, w)

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
            if media == "video" and self.image_encoder is not None:
                num_frames, height, width = frames.shape[1:4]
                for position, index in enumerate(rows):
                    first = Image.fromarray(frames[position, 0])
                    image = self.image_encoder.encode(first, height, width, num_frames)
                    columns[IMAGE_EMBEDS][index] = _numpy(image.image_embeds)
                    columns[IMAGE_CONDITION][index] = _numpy(image.condition)

        return {**batch, **{name: object_column(values) for name, values in columns.items()}}

    def _encode_images(self, pixels: np.ndarray) -> Any:
        pipe, downscale = self.pipes["image"], self.multiples["image"].latent
        height, width = pixels.shape[1:3]  # pixels: (B, H, W, 3) uint8
        if height % downscale or width % downscale:
            # The processor would silently resize; the bucket is wrong for this VAE instead.
            raise ValueError(
                f"image bucket {BucketKey(height, width)}: sides must be multiples of the VAE's "
                f"downscale {downscale} (see buckets.step)"
            )
        image = pipe.image_processor.preprocess(pixels.astype(np.float32) / 255)  # (B, 3, H, W)
        image = image.to(pipe.vae.device, pipe.vae.dtype)
        return pipe.vae.encode(image).latent_dist

    def _encode_videos(self, pixels: np.ndarray) -> Any:
        pipe, multiples = self.pipes["video"], self.multiples["video"]
        num_frames, height, width = pixels.shape[1:4]  # pixels: (B, F, H, W, 3) uint8
        spatial, temporal = multiples.latent, multiples.frames
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
    """Per media kind with a bundle, the factors training normalises the stored (unscaled)
    latents with (the family's ``latent_factors`` of its VAE config, read without loading
    weights): SD3's ``scaling_factor`` and ``shift_factor``, Wan's per-channel
    ``latents_mean`` and ``latents_std``."""
    storage = Storage(config.storage)
    return {
        media: family.latent_factors(component_config(ref.uri, family.vae, storage))
        for media, (ref, family) in _families(
            config.bundle, config.video_bundle, config.storage
        ).items()
    }
