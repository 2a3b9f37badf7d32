"""The shapes domain: the vocabulary, captions and corpus file of `raygen data shapes`.

One coloured shape at one place on a plain light background, captioned exactly
``a {color} {shape} {place}``; in videos the shape moves, ``a {color} {shape} moving
{direction}``. The corpus writer (flows/shapes.py) draws from this vocabulary and the
evaluator's detector (actors/shape_detector.py) reads pixels back into it; neither uses the
other's code. A fixed set of (color, shape, place) triples never appears in a training
corpus, so scores on them measure composition, not memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

# Saturated and far apart in RGB, so a blurry rendering still names its color.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "green": (34, 150, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 200, 20),
    "purple": (130, 50, 170),
    "orange": (245, 125, 20),
}
SHAPES = ("circle", "square", "triangle")
PLACES = ("on the left", "on the right", "at the top", "at the bottom")
DIRECTIONS = ("to the left", "to the right", "up", "down")
BACKGROUND: tuple[int, int, int] = (236, 236, 230)  # light grey, warm

Category = Literal["color", "shape", "place", "direction"]
CATEGORIES: tuple[Category, ...] = ("color", "shape", "place", "direction")

CORPUS_FILE = "shapes.json"  # beside the folder of media files
CORPUS_VERSION = 1

_CAPTION = re.compile(
    rf"^a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) "
    rf"(?:(?P<place>{'|'.join(PLACES)})|moving (?P<direction>{'|'.join(DIRECTIONS)}))$"
)


@dataclass(frozen=True)
class ShapeCaption:
    """What one image or video shows; exactly one of ``place`` (an image) and ``direction``
    (a video) is set."""

    color: str
    shape: str
    place: str | None = None
    direction: str | None = None

    def __post_init__(self) -> None:
        if self.color not in COLORS or self.shape not in SHAPES:
            raise ValueError(f"not a shapes caption: {self}")
        if (self.place is None) == (self.direction is None):
            raise ValueError(f"a shapes caption has a place or a direction: {self}")
        if self.place is not None and self.place not in PLACES:
            raise ValueError(f"unknown place {self.place!r}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}")

    @property
    def text(self) -> str:
        where = self.place if self.place is not None else f"moving {self.direction}"
        return f"a {self.color} {self.shape} {where}"

    def value(self, category: Category) -> str | None:
        return getattr(self, category)

    @classmethod
    def parse(cls, text: str) -> ShapeCaption | None:
        """The caption a text is, or None where it is not one (any other prompt)."""
        match = _CAPTION.match(text.strip().lower())
        if match is None:
            return None
        color, shape = match.group(1), match.group(2)
        return cls(color, shape, place=match["place"], direction=match["direction"])


def _held_out() -> tuple[ShapeCaption, ...]:
    """Two triples per color, spread so that each shape is held out four times and each
    place three times, and every color, shape and place still trains in other triples."""
    colors = list(COLORS)
    held = []
    for index, color in enumerate(colors):
        held.append(ShapeCaption(color, SHAPES[index % 3], place=PLACES[index % 4]))
        held.append(ShapeCaption(color, SHAPES[(index + 1) % 3], place=PLACES[(index + 2) % 4]))
    return tuple(held)


HELD_OUT: tuple[ShapeCaption, ...] = _held_out()


def _video_prompts() -> tuple[ShapeCaption, ...]:
    """`raygen evaluate`'s default prompts for a video model: two motions per color, each
    direction three times and each shape four times."""
    held = []
    for index, color in enumerate(COLORS):
        held.append(ShapeCaption(color, SHAPES[index % 3], direction=DIRECTIONS[index % 4]))
        held.append(
            ShapeCaption(color, SHAPES[(index + 1) % 3], direction=DIRECTIONS[(index + 2) % 4])
        )
    return tuple(held)


VIDEO_PROMPTS: tuple[ShapeCaption, ...] = _video_prompts()


def training_triples() -> list[ShapeCaption]:
    """Every (color, shape, place) an image of a training corpus may show."""
    held = set(HELD_OUT)
    return [
        caption
        for color in COLORS
        for shape in SHAPES
        for place in PLACES
        if (caption := ShapeCaption(color, shape, place=place)) not in held
    ]


class ShapesItem(BaseModel):
    """One file of the corpus (its path in the corpus folder) and what it shows."""

    model_config = ConfigDict(extra="forbid")

    file: str
    caption: str


class ShapesCorpus(BaseModel):
    """``shapes.json``: how the corpus was made, its held-out prompts and its files."""

    model_config = ConfigDict(extra="forbid")

    version: int = CORPUS_VERSION
    seed: int
    size: int
    num_frames: int
    fps: int
    held_out: list[str]
    images: list[ShapesItem]
    videos: list[ShapesItem]
