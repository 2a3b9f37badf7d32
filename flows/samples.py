"""A small sample corpus for the demo: real photographs, synthetic images and short videos.

The photographs are scikit-image's sample images, which ship inside its wheel (no download).
Everything else is drawn here from a seed, so the same seed gives the same corpus.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

# scikit-image sample photographs (file in skimage/data) -> the caption a web scrape might carry.
PHOTOS = {
    "astronaut.png": "portrait of an astronaut in a spacesuit in front of a flag",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer, seen from above",
    "rocket.jpg": "a rocket on the launch pad at dusk",
    "motorcycle_left.png": "a motorcycle parked in a workshop",
    "hubble_deep_field.jpg": "galaxies in the deep field of a space telescope",
}

# (width, height) of the synthetic images: several aspect ratios so bucketing has work to do.
SYNTHETIC_SIZES = [(96, 64), (64, 96), (80, 80), (128, 64), (64, 64), (72, 128)]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square"]


def _photos_dir() -> Path | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _write_photos(out: Path) -> int:
    source = _photos_dir()
    if source is None:
        print("scikit-image is not installed: the sample corpus has no photographs")
        return 0
    for name, caption in PHOTOS.items():
        stem = Path(name).stem
        shutil.copyfile(source / name, out / f"photo_{stem}{Path(name).suffix}")
        (out / f"photo_{stem}.txt").write_text(caption + "\n")
    return len(PHOTOS)


def _draw_shape(size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    width, height = size
    background, colour = rng.choice(COLOURS, size=2, replace=False)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    image = Image.new("RGB", size, str(background))
    radius = int(min(width, height) * rng.uniform(0.2, 0.4))
    cx, cy = int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=str(colour))
    return image, f"a {colour} {shape} on a {background} background"


def _write_synthetic(out: Path, rng: np.random.Generator) -> int:
    for index, size in enumerate(SYNTHETIC_SIZES):
        image, caption = _draw_shape(size, rng)
        # Alternate formats so decoding sees both lossless and lossy inputs.
        suffix = ".png" if index % 2 == 0 else ".jpg"
        image.save(out / f"synthetic_{index:02d}{suffix}")
        (out / f"synthetic_{index:02d}.txt").write_text(caption + "\n")
    return len(SYNTHETIC_SIZES)


def write_video(path: Path, num_frames: int, size: tuple[int, int], fps: int, seed: int) -> None:
    """A square moving across a background: an mp4 (H.264) written with PyAV."""
    rng = np.random.default_rng(seed)
    width, height = size
    colour = rng.integers(64, 256, size=3, dtype=np.uint8)
    side = min(width, height) // 3
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(num_frames):
            frame = np.full((height, width, 3), 32, dtype=np.uint8)  # (H, W, 3)
            x = (index * (width - side)) // max(num_frames - 1, 1)
            frame[height // 3 : height // 3 + side, x : x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def build_sample_corpus(out_dir: str | Path, seed: int = 0, num_videos: int = 2) -> dict[str, int]:
    """Write the sample corpus into ``out_dir``; returns counts by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"photos": _write_photos(out), "synthetic": _write_synthetic(out, rng)}
    for index in range(num_videos):
        write_video(out / f"video_{index:02d}.mp4", num_frames=17, size=(64, 48), fps=8, seed=seed + index)
        (out / f"video_{index:02d}.txt").write_text("a coloured square sliding to the right\n")
    counts["videos"] = num_videos
    return counts
