"""Reads a shapes-domain image (or video) back into words: which color, which shape, where
(or which way it moves). `raygen evaluate` scores prompt following with it, GenEval-style.

Thresholds and geometry only, no learned model: it cannot have learned the generator's
habits, and its verdicts can be checked by eye. It knows the domain's palette and
background (schemas/shapes.py), not how the corpus writer draws.

- Foreground: pixels far (in RGB) from the background, which is the median of the border.
  An image whose border is not plain, or whose foreground is tiny or most of the picture,
  shows no shape: every field None (such an image follows no prompt).
- Color: the nearest palette color to the foreground's median color.
- Place: the side of the centre the foreground's centroid lies furthest towards.
- Shape: nearest prototype of three features of the foreground mask, measured in its
  bounding box: how much of the box it fills (square 1, circle pi/4, triangle 1/2) and how
  wide its top and bottom quarters are against the box (a triangle: narrow top, wide
  bottom; a circle: both about 0.6; a square: both 1). A fringe is not measured: an outermost
  row (column) less than half as wide as the full one beside it, as a decoder's ringing
  leaves along a square's edge, would add a narrow row to the box and read the square as a
  circle. A circle's or a triangle's narrow rows lie beside rows that are narrow too.
- Direction (videos): the way the centroid travelled from the first frame with a shape to
  the last.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from schemas.shapes import COLORS, DIRECTIONS, PLACES, ShapeCaption

# A pixel is foreground when this far (RGB, 0-255) from the background: about half the
# distance from the background to its nearest palette color.
FOREGROUND_DISTANCE = 90.0
# A plain border: its pixels' median distance from their median, at most this.
BORDER_SPREAD = 30.0
# The foreground's share of the image for it to be one shape.
MIN_AREA, MAX_AREA = 0.01, 0.5
# (fill, top-quarter width, bottom-quarter width) of each ideal shape in its bounding box.
SHAPE_PROTOTYPES = {
    "square": (1.0, 1.0, 1.0),
    "circle": (np.pi / 4, 0.61, 0.61),
    "triangle": (0.5, 0.125, 0.875),
}
# A video moves when its centroid travels at least this fraction of the side.
MIN_TRAVEL = 0.1

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)  # (6, 3)


@dataclass(frozen=True)
class Detection:
    """What an image shows; None where it shows no shape (or a video does not move)."""

    color: str | None = None
    shape: str | None = None
    place: str | None = None
    direction: str | None = None
    # Centroid (x, y) as fractions of the width and height; None without a shape.
    centroid: tuple[float, float] | None = None

    def matches(self, caption: ShapeCaption) -> dict[str, bool]:
        """Per category of ``caption`` (color, shape, and place or direction): detected as
        the caption says."""
        categories = ["color", "shape", "place" if caption.place else "direction"]
        return {
            c: getattr(self, c) is not None and getattr(self, c) == caption.value(c)
            for c in categories
        }


def _foreground(image: np.ndarray) -> np.ndarray | None:
    """Mask (H, W) of the pixels that are not background, or None if the image shows no
    single shape on a plain background."""
    pixels = image[..., :3].astype(np.float32)  # (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (B, 3)
    background = np.median(border, axis=0)  # (3,)
    if np.median(np.linalg.norm(border - np.median(border, axis=0), axis=-1)) > BORDER_SPREAD:
        return None
    mask = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE  # (H, W)
    if not MIN_AREA <= mask.mean() <= MAX_AREA:
        return None
    return mask


# A row beside a full one (at least this share of the box) is a fringe below half of it.
FULL_ROW, FRINGE = 0.75, 0.5


def _box(mask: np.ndarray) -> np.ndarray:
    """The mask in its bounding box (h, w)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _without_fringe(box: np.ndarray) -> np.ndarray:
    """``box`` without an outermost row or column that is a fringe of the full one beside it."""
    for _ in range(2):  # rows, then columns (the box transposed)
        if box.shape[0] > 2:
            widths = box.sum(axis=1)  # (h,)
            full = FULL_ROW * box.shape[1]
            begin = int(widths[1] >= full and widths[0] < FRINGE * widths[1])
            end = box.shape[0] - int(widths[-2] >= full and widths[-1] < FRINGE * widths[-2])
            box = box[begin:end]
        box = box.T
    return _box(box)


def _shape(mask: np.ndarray) -> str:
    box = _without_fringe(_box(mask))  # (h, w)
    height, width = box.shape
    fill = box.mean()
    widths = box.sum(axis=1) / width  # (h,) each row's share of the box's width
    quarter = max(height // 4, 1)
    top, bottom = widths[:quarter].mean(), widths[-quarter:].mean()
    features = np.asarray([fill, top, bottom])
    distances = {
        name: float(np.linalg.norm(features - np.asarray(prototype)))
        for name, prototype in SHAPE_PROTOTYPES.items()
    }
    return min(distances, key=distances.get)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    return float((xs.mean() + 0.5) / width), float((ys.mean() + 0.5) / height)


def detect_image(image: np.ndarray) -> Detection:
    """``image``: (H, W, 3) uint8 RGB (an alpha channel is ignored)."""
    mask = _foreground(image)
    if mask is None:
        return Detection()
    pixels = image[..., :3][mask].astype(np.float32)  # (N, 3)
    color = _PALETTE_NAMES[
        int(np.argmin(np.linalg.norm(_PALETTE - np.median(pixels, axis=0), axis=-1)))
    ]
    x, y = _centroid(mask)
    dx, dy = x - 0.5, y - 0.5
    if abs(dx) >= abs(dy):
        place = PLACES[0] if dx < 0 else PLACES[1]  # on the left / on the right
    else:
        place = PLACES[2] if dy < 0 else PLACES[3]  # at the top / at the bottom
    return Detection(color=color, shape=_shape(mask), place=place, centroid=(x, y))


def detect_video(frames: np.ndarray) -> Detection:
    """``frames``: (F, H, W, 3) uint8. Color and shape from the middle frame with a shape,
    the direction from the centroid's travel; no place (a moving shape has none)."""
    detections = [detect_image(frame) for frame in frames]
    seen = [d for d in detections if d.centroid is not None]
    if not seen:
        return Detection()
    middle = seen[len(seen) // 2]
    (x0, y0), (x1, y1) = seen[0].centroid, seen[-1].centroid
    dx, dy = x1 - x0, y1 - y0
    direction = None
    if max(abs(dx), abs(dy)) >= MIN_TRAVEL:
        if abs(dx) >= abs(dy):
            direction = DIRECTIONS[0] if dx < 0 else DIRECTIONS[1]  # to the left / right
        else:
            direction = DIRECTIONS[2] if dy < 0 else DIRECTIONS[3]  # up / down
    return Detection(
        color=middle.color, shape=middle.shape, direction=direction, centroid=middle.centroid
    )
