"""Shared handling of Ray Data numpy batches for the prep model stages.

A batch is ``dict[str, np.ndarray]``, one entry per column, one row per index. Rows whose
``status`` is not "ok" pass through every model stage untouched; the stages fill their new
columns for them with empty values so that every column stays convertible to Arrow.

Ray turns an object column of arrays into its tensor types only when every array in the
column has the same number of dimensions (otherwise it falls back to pickled objects, which
do not concatenate with the tensor blocks of other batches). So an empty value is an array
of size 0 with the *same* ndim as the column's real values: ``(0,)`` for pooled embeddings,
``(0, 0)`` for sequence embeddings, ``(0, 0, 0)`` / ``(0, 0, 0, 0)`` for image / clip latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

OK = "ok"


def num_rows(batch: dict[str, np.ndarray]) -> int:
    return len(batch["sample_id"])


def ok_rows(batch: dict[str, np.ndarray]) -> list[int]:
    return [index for index, status in enumerate(batch["status"]) if status == OK]


def media_rows(batch: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, list[int]]:
    """``rows`` split by media kind ("image", "video"), each in input order."""
    groups: dict[str, list[int]] = {}
    for index in rows:
        groups.setdefault(str(batch["media_kind"][index]), []).append(index)
    unknown = set(groups) - {"image", "video"}
    if unknown:
        raise ValueError(f"media_kind {sorted(unknown)}: expected 'image' or 'video'")
    return groups


def pixel_groups(
    batch: dict[str, np.ndarray], rows: Sequence[int]
) -> dict[tuple[str, tuple[int, ...]], list[int]]:
    """``rows`` grouped by (media kind, frames shape): each group stacks into one model call."""
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for kind, indices in media_rows(batch, rows).items():
        for index in indices:
            groups.setdefault((kind, row_frames(batch, index).shape), []).append(index)
    return groups


def row_frames(batch: dict[str, np.ndarray], index: int) -> np.ndarray:
    """A row's pixels as frames, (F, H, W, 3) uint8; an image is one frame.

    Decode hands an image over as (1, H, W, 3), which keeps the column's ndim the same for
    images and clips; (H, W, 3) is taken as well.
    """
    pixels, kind = batch["pixels"][index], str(batch["media_kind"][index])
    if kind == "image" and pixels.ndim == 3:
        pixels = pixels[None]
    valid_frames = pixels.ndim == 4 and (kind == "video" or len(pixels) == 1)
    if pixels.dtype != np.uint8 or not valid_frames or pixels.shape[-1] != 3:
        expected = "(1, H, W, 3) or (H, W, 3)" if kind == "image" else "(F, H, W, 3)"
        raise ValueError(
            f"{batch['sample_id'][index]}: {kind} pixels must be uint8 with shape {expected}, "
            f"got {pixels.dtype} {pixels.shape}"
        )
    return pixels


def empty_tensor(ndim: int) -> np.ndarray:
    """A float32 array of size 0 standing in for a missing tensor value of ``ndim`` dims."""
    return np.zeros((0,) * ndim, dtype=np.float32)


# Columns of text that may be missing (None).
OPTIONAL_TEXT_COLUMNS = ("caption_original", "caption_synthetic", "detail")


def optional_text(value: object) -> str | None:
    """A str column value, or None. Ray hands a column that is all None in its block to
    numpy as float32 NaN (an Arrow null column has no type to restore), so a missing value
    may arrive as NaN."""
    return value if isinstance(value, str) else None


def restore_optional_text(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with NaN-for-None text columns turned back into None.

    Stages pass columns they do not own through; a NaN column passed on would become a float
    column that Ray cannot unify with the string column of another block.
    """
    for name in OPTIONAL_TEXT_COLUMNS:
        if name in batch and batch[name].dtype != object:
            batch[name] = object_column([optional_text(value) for value in batch[name]])
    return batch


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-shaped
    arrays and turn bytes into fixed-width, NUL-stripping ``S`` strings)."""
    column = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        column[index] = value
    return column


def rows_to_batch(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Row dicts as the numpy batch Ray Data hands a stage, for calling stages from plain
    Python: arrays, strings and None in object columns, numbers in numeric ones."""
    batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        numeric = all(isinstance(value, int | float | np.number) for value in values)
        batch[name] = np.asarray(values) if numeric else object_column(values)
    return batch
