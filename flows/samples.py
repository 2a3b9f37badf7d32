"""A small sample corpus for the demo: real photographs, synthetic images and short videos,
a WebDataset tar, and files that prep must quarantine (or decode despite their oddities).

The photographs are scikit-image's sample images, which ship inside its wheel (no download).
Everything else is drawn here from a seed, so the same seed gives the same corpus.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import struct
import tarfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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
WEBDATASET_SAMPLES = 3
PDF_DATE = time.gmtime(1_704_067_200)  # 2024-01-01


def photos_dir() -> Path | None:
    """scikit-image's sample photographs (found, not imported), or None where it is absent."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def _write_photos(out: Path) -> int:
    source = photos_dir()
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


def write_frames(path: Path, frames: np.ndarray, fps: int) -> None:
    """An mp4 (H.264) of ``frames`` (F, H, W, 3) uint8, written with PyAV."""
    _, height, width, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # The same seed must give the same bytes. x264 varies with thread scheduling, and,
        # even on one thread, its macroblock-tree lookahead varied run to run here on small
        # frames (32-96 px: 2-3 different outputs in 25 encodes of the same frames; none
        # without it; the CI flake of test_same_seed_same_corpus).
        stream.codec_context.thread_count = 1
        stream.options = {"x264-params": "mbtree=0"}
        for frame in frames:  # (H, W, 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path: Path, num_frames: int, size: tuple[int, int], fps: int, seed: int) -> None:
    """A square moving across a background: an mp4 (H.264) written with PyAV."""
    rng = np.random.default_rng(seed)
    width, height = size
    colour = rng.integers(64, 256, size=3, dtype=np.uint8)
    side = min(width, height) // 3
    frames = np.full((num_frames, height, width, 3), 32, dtype=np.uint8)  # (F, H, W, 3)
    for index, frame in enumerate(frames):
        x = (index * (width - side)) // max(num_frames - 1, 1)
        frame[height // 3 : height // 3 + side, x : x + side] = colour
    write_frames(path, frames, fps)


def write_webdataset_tar(path: Path, samples: Mapping[str, Mapping[str, bytes]]) -> None:
    """A WebDataset tar in img2dataset's layout: ``{key: {"jpg": ..., "txt": ..., "json": ...}}``
    becomes members ``key.jpg``, ``key.txt``, ``key.json``, a sample's members together.

    Member headers carry no time or owner, so the same samples give the same bytes.
    """
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))


def write_listing(path: Path, rows: list[dict[str, Any]]) -> None:
    """A listing prep reads as its input: rows with ``uri`` (and ``caption``), as .parquet or
    .jsonl by ``path``'s suffix."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        raise ValueError(f"{path}: a listing is .parquet or .jsonl")


def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of a few bytes whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _halves(size: tuple[int, int], left: Any, right: Any, mode: str = "RGB") -> Image.Image:
    """An image of ``size`` whose left half is ``left`` and right half ``right``."""
    width, height = size
    image = Image.new(mode, size, left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def build_broken_files(out_dir: str | Path, seed: int = 0) -> dict[str, str | None]:
    """Write files prep must handle without stopping; returns file name -> expected reason.

    "broken_*" files must be quarantined with that reason (default DecodeConfig: min_side
    16, 9-frame clips at 8 fps). "unusual_*" images (reason None) are valid but awkward
    (CMYK, 16-bit, palette with transparency, alpha, EXIF-rotated) and must decode to RGB.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photo = Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8))  # (H, W, 3)
    png, jpeg = _encoded(photo, "PNG"), _encoded(photo, "JPEG")
    # 16-bit grey: values that 8-bit clipping would turn all white.
    grey16 = np.full((32, 48), 0x4000, dtype=np.uint16)  # (H, W)
    grey16[:, 24:] = 0xC000
    palette = _halves((48, 32), 0, 1, mode="P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    # Stored landscape, left red / right blue; orientation 6 shows it rotated 90 degrees
    # clockwise: portrait, red on top.
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = np.zeros((3, 32, 32, 3), dtype=np.uint8)  # (F, H, W, 3)
    # Two frames, left red / right blue then all green: prep takes the first.
    animation = _halves((48, 32), 0, 1, mode="P")
    animation.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    second = Image.new("P", (48, 32), 2)
    second.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    files = {
        "broken_empty.jpg": ("empty_file", b""),
        "broken_truncated.png": ("truncated", png[: len(png) // 2]),
        "broken_truncated.jpg": ("truncated", jpeg[: len(jpeg) // 2]),
        "broken_random.jpg": ("corrupt", rng.bytes(2048)),
        # PIL writes PDFs but reads none: not an image input. Dated, so a seed gives its bytes.
        "broken_document.pdf": (
            "unsupported_format",
            _encoded(photo, "PDF", creationDate=PDF_DATE, modDate=PDF_DATE),
        ),
        "broken_bomb.png": ("decompression_bomb", _png_declaring(100_000, 100_000)),
        "broken_tiny.png": ("too_small", _encoded(photo.resize((12, 8)), "PNG")),
        "broken_random.mp4": ("corrupt", rng.bytes(4096)),
        "unusual_cmyk.jpg": (None, _encoded(Image.new("CMYK", (48, 32), (0, 255, 255, 0)), "JPEG")),
        "unusual_16bit.png": (None, _encoded(Image.fromarray(grey16), "PNG")),
        "unusual_palette_alpha.png": (None, _encoded(palette, "PNG", transparency=0)),
        "unusual_rgba.png": (
            None,
            _encoded(_halves((48, 32), (255, 0, 0, 0), (0, 128, 0, 255), "RGBA"), "PNG"),
        ),
        "unusual_exif_rotated.jpg": (
            None,
            _encoded(_halves((48, 32), "red", "blue"), "JPEG", exif=exif.tobytes()),
        ),
        "unusual_animation.gif": (
            None,
            _encoded(animation, "GIF", save_all=True, append_images=[second], duration=100),
        ),
    }
    for name, (_, data) in files.items():
        (out / name).write_bytes(data)
    write_frames(out / "broken_short.mp4", frames, fps=8)  # 3 frames: no 9-frame clip
    return {name: reason for name, (reason, _) in files.items()} | {"broken_short.mp4": "too_short"}


def _write_webdataset(out: Path, rng: np.random.Generator) -> int:
    samples = {}
    for index, size in enumerate(SYNTHETIC_SIZES[:WEBDATASET_SAMPLES]):
        image, caption = _draw_shape(size, rng)
        key = f"{index:09d}"
        metadata = {"key": key, "caption": caption, "width": size[0], "height": size[1]}
        samples[key] = {
            "jpg": _encoded(image, "JPEG"),
            "txt": caption.encode(),
            "json": json.dumps(metadata).encode(),
        }
    write_webdataset_tar(out / "webdataset_00000.tar", samples)
    return len(samples)


def build_sample_corpus(out_dir: str | Path, seed: int = 0, num_videos: int = 2) -> dict[str, int]:
    """Write the sample corpus into ``out_dir``; returns counts by kind ("broken": files
    prep quarantines, "unusual": odd but valid images, see ``build_broken_files``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"photos": _write_photos(out), "synthetic": _write_synthetic(out, rng)}
    for index in range(num_videos):
        write_video(
            out / f"video_{index:02d}.mp4", num_frames=17, size=(64, 48), fps=8, seed=seed + index
        )
        (out / f"video_{index:02d}.txt").write_text("a coloured square sliding to the right\n")
    counts["videos"] = num_videos
    counts["webdataset"] = _write_webdataset(out, rng)
    expected = build_broken_files(out, seed=seed)
    counts["broken"] = sum(1 for reason in expected.values() if reason)
    counts["unusual"] = len(expected) - counts["broken"]
    return counts
