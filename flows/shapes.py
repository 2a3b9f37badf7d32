"""`raygen data shapes`: a synthetic text-to-image (and video) corpus whose captions say
exactly what the pixels show, so that a model trained on it can be checked for following
its prompts (see schemas/shapes.py for the vocabulary and the held-out triples).

Layout: ``train/`` holds the media, ``shape_NNNNN.png`` with a ``.txt`` caption and
``motion_NNNN.mp4`` with theirs, a folder `raygen prep` reads like any other corpus;
``shapes.json`` beside it lists every file with its caption, and the held-out prompts. Drawn
at 4x and reduced (antialiased edges), from one seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flows.samples import write_frames
from schemas.shapes import (
    BACKGROUND,
    COLORS,
    CORPUS_FILE,
    DIRECTIONS,
    HELD_OUT,
    SHAPES,
    ShapeCaption,
    ShapesCorpus,
    ShapesItem,
    training_triples,
)

MEDIA_DIR = "train"  # what `raygen prep --input` reads
SUPERSAMPLE = 4
# A shape's extent (its bounding box side) as a fraction of the image side, before jitter.
EXTENT = 0.34
SIZE_JITTER = 0.15  # the extent varies by up to this fraction either way
POSITION_JITTER = 0.05  # the centre moves by up to this fraction of the side either way
BACKGROUND_JITTER = 6  # per channel, so "plain" is not one exact value
# Centres of the places (x, y) as fractions of the side.
PLACE_CENTRES = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
}
# A moving shape travels this far (fraction of the side) along its direction, centred.
TRAVEL = 0.45
DIRECTION_STEP = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    jitter = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.asarray(BACKGROUND) + jitter, 0, 255))


def draw_shape(
    side: int,
    shape: str,
    color: str,
    centre: tuple[float, float],
    extent: float,
    background: tuple[int, int, int],
) -> Image.Image:
    """One ``shape`` of ``extent`` (fraction of ``side``) centred at ``centre`` (fractions of
    the side, x then y) on ``background``: a ``side`` x ``side`` RGB image."""
    big = side * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    cx, cy = centre[0] * big, centre[1] * big
    half = extent * big / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright isosceles triangle filling its box
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((side, side), Image.Resampling.BOX)


def _jittered(rng: np.random.Generator, centre: tuple[float, float]) -> tuple[float, float]:
    dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    return centre[0] + float(dx), centre[1] + float(dy)


def shape_image(caption: ShapeCaption, side: int, rng: np.random.Generator) -> Image.Image:
    """An image of ``caption`` (a place caption), jittered by ``rng``."""
    extent = EXTENT * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    centre = _jittered(rng, PLACE_CENTRES[caption.place])
    return draw_shape(side, caption.shape, caption.color, centre, extent, _background(rng))


def shape_video(
    caption: ShapeCaption, side: int, num_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of ``caption``'s shape moving in its direction."""
    extent = EXTENT * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    background = _background(rng)
    start = _jittered(rng, (0.5, 0.5))
    step_x, step_y = DIRECTION_STEP[caption.direction]
    frames = []
    for index in range(num_frames):
        along = TRAVEL * (index / max(num_frames - 1, 1) - 0.5)
        centre = (start[0] + step_x * along, start[1] + step_y * along)
        image = draw_shape(side, caption.shape, caption.color, centre, extent, background)
        frames.append(np.asarray(image))
    return np.stack(frames)  # (F, H, W, 3)


def build_shapes_corpus(
    out_dir: str | Path,
    count: int = 1000,
    size: int = 64,
    videos: int = 0,
    seed: int = 0,
    num_frames: int = 17,
    fps: int = 8,
) -> ShapesCorpus:
    """Write ``count`` images (training triples only, cycled in a seeded order so that each
    appears about equally often) and ``videos`` videos into ``out_dir/train``, and
    ``out_dir/shapes.json``; returns what ``shapes.json`` holds."""
    if count < 0 or videos < 0:
        raise ValueError("count and videos cannot be negative")
    if size < 16:
        raise ValueError(f"size {size}: at least 16 pixels, or a shape has no room")
    out = Path(out_dir)
    media = out / MEDIA_DIR
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    triples = training_triples()
    images = []
    order: list[int] = []
    for index in range(count):
        if not order:  # each round shows every training triple once, shuffled
            order = list(rng.permutation(len(triples)))
        caption = triples[order.pop()]
        name = f"shape_{index:05d}"
        shape_image(caption, size, rng).save(media / f"{name}.png")
        (media / f"{name}.txt").write_text(caption.text + "\n")
        images.append(ShapesItem(file=f"{MEDIA_DIR}/{name}.png", caption=caption.text))
    motions = []
    for index in range(videos):
        caption = ShapeCaption(
            color=list(COLORS)[int(rng.integers(len(COLORS)))],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            direction=DIRECTIONS[index % len(DIRECTIONS)],
        )
        name = f"motion_{index:04d}"
        write_frames(media / f"{name}.mp4", shape_video(caption, size, num_frames, rng), fps)
        (media / f"{name}.txt").write_text(caption.text + "\n")
        motions.append(ShapesItem(file=f"{MEDIA_DIR}/{name}.mp4", caption=caption.text))
    corpus = ShapesCorpus(
        seed=seed,
        size=size,
        num_frames=num_frames,
        fps=fps,
        held_out=[caption.text for caption in HELD_OUT],
        images=images,
        videos=motions,
    )
    (out / CORPUS_FILE).write_text(json.dumps(corpus.model_dump(), indent=1) + "\n")
    return corpus


def read_shapes_corpus(folder: str | Path) -> ShapesCorpus:
    path = Path(folder) / CORPUS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: no {CORPUS_FILE}; write one with `raygen data shapes`")
    return ShapesCorpus.model_validate_json(path.read_text())
