"""Prep filters: minimum resolution, CLIP score, and optional aesthetic / NSFW classifiers."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForImageClassification, AutoProcessor, CLIPModel

from actors.batches import OK, num_rows, ok_rows, row_frames
from actors.loaders import load_model, load_processor
from schemas.config import FilterConfig, StorageConfig
from schemas.shards import AESTHETIC_SCORE, CAPTION, CLIP_SCORE, NSFW_SCORE, SCORE_COLUMNS

# (reason, score column, FilterConfig threshold, FilterConfig model), in the order checked.
CHECKS = (
    ("clip_score", CLIP_SCORE, "min_clip_score", "scorer"),
    ("aesthetic", AESTHETIC_SCORE, "min_aesthetic_score", "aesthetic"),
    ("nsfw", NSFW_SCORE, "max_nsfw_score", "nsfw"),
)
# The label whose probability an NSFW classifier reports, as Falconsai/nsfw_image_detection
# and similar ViT classifiers name it in id2label.
NSFW_LABEL = "nsfw"


class Filters:
    """Scores every ok row and marks the ones that miss a threshold as filtered.

    Adds float32 columns (NaN where not computed):

    - ``clip_score``: the cosine similarity, in [-1, 1], of CLIP's projected and L2-normalised
      image and text embeddings of the row's image (a clip's middle frame) and its
      ``caption_original``. CLIPScore (Hessel et al. 2021) is ``2.5 * max(clip_score, 0)``
      and torchmetrics' CLIPScore ``100 * max(clip_score, 0)``. Captions longer than CLIP's
      77 tokens are truncated, as CLIP itself sees them. NaN for rows without a caption,
      which the clip-score threshold then never filters.
    - ``aesthetic_score``: the single regression output of the ``filters.aesthetic`` bundle.
    - ``nsfw_score``: the probability of the "nsfw" label of the ``filters.nsfw`` bundle.

    A row that misses a threshold gets ``status="filtered"``, ``reason`` the first failing
    check in the order "min_resolution" (shorter ORIGINAL side), "clip_score", "aesthetic",
    "nsfw", and ``detail`` the score against its threshold. Rows below the minimum
    resolution are not scored. Rows that are not ok pass through untouched.
    """

    def __init__(self, config: FilterConfig, storage: StorageConfig) -> None:
        self.config = filters = config
        for _, _, threshold, model in CHECKS:
            if getattr(filters, threshold) is not None and getattr(filters, model) is None:
                raise ValueError(f"filters.{threshold} is set but filters.{model} is null")

        self.scorer = self.scorer_processor = None
        if filters.scorer is not None:
            self.scorer = load_model(filters.scorer, CLIPModel, storage)
            self.scorer_processor = load_processor(filters.scorer, AutoProcessor, storage)

        self.aesthetic = self.aesthetic_processor = None
        if filters.aesthetic is not None:
            self.aesthetic = load_model(filters.aesthetic, AutoModelForImageClassification, storage)
            self.aesthetic_processor = load_processor(filters.aesthetic, AutoProcessor, storage)
            if self.aesthetic.config.num_labels != 1:
                raise ValueError(
                    f"filters.aesthetic {filters.aesthetic.uri}: expected a regression head "
                    f"(num_labels=1), got num_labels={self.aesthetic.config.num_labels}"
                )

        self.nsfw = self.nsfw_processor = None
        if filters.nsfw is not None:
            self.nsfw = load_model(filters.nsfw, AutoModelForImageClassification, storage)
            self.nsfw_processor = load_processor(filters.nsfw, AutoProcessor, storage)
            labels = self.nsfw.config.id2label
            matches = [index for index, label in labels.items() if label.lower() == NSFW_LABEL]
            if len(matches) != 1:
                raise ValueError(
                    f"filters.nsfw {filters.nsfw.uri}: expected one label named "
                    f"{NSFW_LABEL!r} in id2label, got {labels}"
                )
            self.nsfw_index = int(matches[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = num_rows(batch)
        # Object copies: the new strings may be longer than a fixed-width input dtype holds.
        status = batch["status"].astype(object)
        reason = batch["reason"].astype(object)
        detail = batch["detail"].astype(object)
        scores = {column: np.full(n, np.nan, dtype=np.float32) for column in SCORE_COLUMNS}

        rows = ok_rows(batch)
        min_resolution = self.config.min_resolution
        for index in rows:
            shorter = int(min(batch["original_height"][index], batch["original_width"][index]))
            if min_resolution and shorter < min_resolution:
                status[index], reason[index] = "filtered", "min_resolution"
                detail[index] = f"shorter side {shorter} px < min_resolution {min_resolution} px"
        rows = [index for index in rows if status[index] == OK]

        if rows:
            frames = []  # (H, W, 3) uint8 each: the image, or a clip's middle frame
            for index in rows:
                row = row_frames(batch, index)
                frames.append(row[len(row) // 2])
            with torch.inference_mode():
                if self.scorer is not None:
                    captioned = [
                        (position, index)
                        for position, index in enumerate(rows)
                        if batch[CAPTION["original"]][index] is not None
                    ]
                    if captioned:
                        clip_scores = self._clip_scores(
                            [frames[position] for position, _ in captioned],
                            [str(batch[CAPTION["original"]][index]) for _, index in captioned],
                        )
                        scores[CLIP_SCORE][[index for _, index in captioned]] = clip_scores
                if self.aesthetic is not None:
                    logits = self._classify(self.aesthetic, self.aesthetic_processor, frames)
                    scores[AESTHETIC_SCORE][rows] = logits[:, 0].numpy()
                if self.nsfw is not None:
                    logits = self._classify(self.nsfw, self.nsfw_processor, frames)
                    probabilities = logits.softmax(dim=-1)  # (B, num_labels)
                    scores[NSFW_SCORE][rows] = probabilities[:, self.nsfw_index].numpy()

        for index in rows:
            for check, column, bound, _ in CHECKS:
                threshold, score = getattr(self.config, bound), scores[column][index]
                if threshold is None or np.isnan(score):
                    continue
                is_maximum = bound.startswith("max_")
                if (score > threshold) if is_maximum else (score < threshold):
                    status[index], reason[index] = "filtered", check
                    relation = ">" if is_maximum else "<"
                    detail[index] = f"{column} {score:.4f} {relation} {bound} {threshold:.4f}"
                    break

        return {**batch, "status": status, "reason": reason, "detail": detail, **scores}

    def _clip_scores(self, frames: list[np.ndarray], captions: list[str]) -> np.ndarray:
        inputs = self.scorer_processor(
            images=frames, text=captions, return_tensors="pt", padding=True, truncation=True
        ).to(self.scorer.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.scorer.dtype)
        # CLIPModel's forward returns the projected embeddings already L2-normalised.
        output = self.scorer(**inputs)
        similarity = (output.image_embeds * output.text_embeds).sum(dim=-1)  # (B,)
        return similarity.float().cpu().numpy()

    @staticmethod
    def _classify(model, processor, frames: list[np.ndarray]) -> torch.Tensor:
        inputs = processor(images=frames, return_tensors="pt").to(model.device)
        pixel_values = inputs["pixel_values"].to(model.dtype)  # (B, 3, h, w)
        return model(pixel_values=pixel_values).logits.float().cpu()  # (B, num_labels)
