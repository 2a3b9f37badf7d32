"""Recaptioning with a vision-language model: the synthetic caption next to the original."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from actors.batches import num_rows, object_column, ok_rows, row_frames
from actors.loaders import load_model, load_processor
from schemas.config import CaptionConfig, StorageConfig
from schemas.shards import CAPTION

# Between the captions of a clip's frames when they say different things.
FRAME_CAPTION_SEPARATOR = "; "


class Captioner:
    """Adds ``caption_synthetic`` (str; None for rows that are not ok).

    The ``caption.model`` bundle is a transformers image-to-text model (BLIP and its kin),
    loaded with ``AutoProcessor`` and the model class its config names. Generation is greedy
    (deterministic), batched over every frame of the batch, at most ``caption.max_new_tokens``
    new tokens. With ``caption.prompt`` the model continues that text (conditional
    captioning) and the prompt is stripped from the caption.

    A video clip is captioned from three frames: middle, first and last. The caption is the
    middle frame's, followed by the first and last frames' captions where they differ from
    those already kept (``"; "`` between them): a static clip reads as one caption, a clip
    whose start or end shows something else keeps that too, at one batched generate call.

    ``caption.model: null`` makes the stage a pass-through (``caption_synthetic`` None).
    """

    def __init__(self, config: CaptionConfig, storage: StorageConfig) -> None:
        self.config = config
        ref = config.model
        self.model = self.processor = None
        if ref is None:
            return
        self.processor = load_processor(ref, AutoProcessor, storage)
        self.model = load_model(ref, AutoModelForImageTextToText, storage)
        # The prompt as the model's own tokenizer writes it back (BLIP's lowercases), which
        # is how it starts each decoded caption.
        self.prompt_text = ""
        if self.config.prompt:
            prompt_ids = self.processor.tokenizer(self.config.prompt).input_ids
            self.prompt_text = self.processor.decode(prompt_ids, skip_special_tokens=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions: list[str | None] = [None] * num_rows(batch)
        rows = ok_rows(batch)
        if self.model is None or not rows:
            return {**batch, CAPTION["synthetic"]: object_column(captions)}

        frames: list[np.ndarray] = []  # (H, W, 3) uint8 each
        frame_rows: list[int] = []
        for index in rows:
            row = row_frames(batch, index)  # (F, H, W, 3); an image is its only frame
            middle, last = len(row) // 2, len(row) - 1
            picked = [row[frame] for frame in dict.fromkeys((middle, 0, last))]
            frames += picked
            frame_rows += [index] * len(picked)

        frame_captions = self._generate(frames)
        per_row: dict[int, list[str]] = {}
        for index, caption in zip(frame_rows, frame_captions, strict=True):
            per_row.setdefault(index, []).append(caption)
        for index, row_captions in per_row.items():
            captions[index] = FRAME_CAPTION_SEPARATOR.join(dict.fromkeys(row_captions))
        return {**batch, CAPTION["synthetic"]: object_column(captions)}

    def _generate(self, frames: list[np.ndarray]) -> list[str]:
        text = [self.config.prompt] * len(frames) if self.config.prompt else None
        inputs = self.processor(images=frames, text=text, return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)  # (B, 3, h, w)
        with torch.inference_mode():
            output_ids = self.model.generate(
                **inputs,
                max_new_tokens=self.config.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )  # (B, T)
        decoded = self.processor.batch_decode(output_ids, skip_special_tokens=True)
        return [caption.removeprefix(self.prompt_text).strip() for caption in decoded]
