"""raygen's invisible watermark, on every image and every video frame served (the serving
graph's decode stages write it; ``raygen watermark detect`` reads it). NumPy only, so that
reading a watermark loads no model library.

The watermark is dithered quantization index modulation (QIM; Chen & Wornell 2001) of
mid-frequency 8x8 block-DCT coefficients, the domain JPEG and most invisible watermarks
(``invisible-watermark``'s dwtDct among them) work in. A 32-bit message derived from a key is
spread over every full 8x8 block of each RGB channel: each coefficient carries one bit by being
moved to the nearest point of one of two interleaved lattices (step ``WATERMARK_STEP``,
shifted by a key-derived dither). Reading needs only the key: every coefficient votes for the
lattice it lies nearer to, each bit takes the majority of its coefficients, and the image is
watermarked when at least ``WATERMARK_MIN_BITS`` of the 32 bits match. The change is a few
levels of 255 in a few coefficients (about 49 dB PSNR) and survives any lossless encoding
(PNG) and raygen's near-lossless, full-chroma MP4s (``actors/video.py``); it is not meant to
survive resizing, JPEG or ordinary 4:2:0 video encoding. On an unmarked image the bits are
coin flips, so a false detection has odds of about 1 in 780,000.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

WATERMARK_BITS = 32
WATERMARK_MIN_BITS = 29  # matching bits that count as "watermarked"
WATERMARK_STEP = 6.0  # QIM lattice step, in levels of 255 of an orthonormal DCT coefficient
_BLOCK = 8
# Mid-frequency coefficients (u + v in 3..5) of an 8x8 block: low ones would show, high ones
# carry little energy in natural images.
_BAND = tuple((u, v) for u in range(_BLOCK) for v in range(_BLOCK) if 3 <= u + v <= 5)



@dataclass(frozen=True)
class WatermarkReading:
    matched_bits: int
    num_bits: int = WATERMARK_BITS

    @property
    def present(self) -> bool:
        return self.matched_bits >= WATERMARK_MIN_BITS


def embed_watermark(image: np.ndarray, key: str) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with the key's watermark in it, as uint8."""
    pixels = _check_image(image).astype(np.float64)
    layout = _Layout(key, pixels.shape)
    for _ in range(3):
        # Rounding to uint8 and clipping at 0 and 255 move a few coefficients off their
        # lattice; marking the rounded image again puts nearly all of them back.
        coefficients = _block_dct(pixels)
        coefficients[layout.slots] = _quantize(coefficients[layout.slots], layout)
        pixels = np.clip(np.round(_block_idct(coefficients, pixels)), 0, 255)
    return pixels.astype(np.uint8)


def detect_watermark(image: np.ndarray, key: str) -> WatermarkReading:
    """How many of the key's message bits ``image`` (H, W, 3) uint8 carries."""
    pixels = _check_image(image).astype(np.float64)
    layout = _Layout(key, pixels.shape)
    values = _block_dct(pixels)[layout.slots]
    # Position within the dithered lattice cell: near 0 reads bit 0, near 1/2 reads bit 1.
    phase = np.mod((values - layout.dither) / WATERMARK_STEP, 1.0)
    votes = np.where((phase >= 0.25) & (phase < 0.75), 1.0, -1.0)
    tally = np.bincount(layout.bit_of_slot, weights=votes, minlength=WATERMARK_BITS)
    bits = (tally > 0).astype(np.uint8)
    return WatermarkReading(matched_bits=int((bits == layout.message).sum()))


def watermark_message(key: str) -> np.ndarray:
    """The ``WATERMARK_BITS`` bits (uint8 0/1) a key writes."""
    digest = hashlib.sha256(f"raygen-watermark:{key}".encode()).digest()
    return np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:WATERMARK_BITS]


class _Layout:
    """Where each message bit goes in an image of one shape, and each coefficient's dither."""

    def __init__(self, key: str, shape: tuple[int, ...]) -> None:
        height, width, channels = shape
        rows, cols = height // _BLOCK, width // _BLOCK
        # Index arrays into the (rows, cols, channels, 8, 8) block-DCT array: every band
        # coefficient of every full block of every channel.
        r, c, ch, b = np.meshgrid(
            np.arange(rows), np.arange(cols), np.arange(channels), np.arange(len(_BAND)),
            indexing="ij",
        )  # fmt: skip
        band = np.array(_BAND)  # (K, 2)
        self.slots = (
            r.ravel(),
            c.ravel(),
            ch.ravel(),
            band[b.ravel(), 0],
            band[b.ravel(), 1],
        )
        num_slots = r.size
        if num_slots < WATERMARK_BITS:
            raise ValueError(f"image {height}x{width} is too small to carry a watermark")
        seed = hashlib.sha256(f"raygen-watermark:{key}:{height}x{width}x{channels}".encode())
        rng = np.random.default_rng(int.from_bytes(seed.digest()[:8], "little"))
        # Every bit gets an equal share of the coefficients, scattered over the image.
        self.bit_of_slot = rng.permutation(np.arange(num_slots) % WATERMARK_BITS)
        self.dither = rng.uniform(0.0, WATERMARK_STEP, num_slots)
        self.message = watermark_message(key)
        self.offset = self.message[self.bit_of_slot] * (WATERMARK_STEP / 2)


def _quantize(values: np.ndarray, layout: _Layout) -> np.ndarray:
    """Each value moved to the nearest point of its bit's dithered lattice."""
    shift = layout.dither + layout.offset
    return np.round((values - shift) / WATERMARK_STEP) * WATERMARK_STEP + shift


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return image


def _dct_matrix() -> np.ndarray:
    """The orthonormal DCT-II matrix (8, 8): coefficients = D @ block @ D.T."""
    k = np.arange(_BLOCK)[:, None]
    n = np.arange(_BLOCK)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * _BLOCK)) * np.sqrt(2 / _BLOCK)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix()


def _block_dct(pixels: np.ndarray) -> np.ndarray:
    """(H, W, C) -> (rows, cols, C, 8, 8) DCT coefficients of the full 8x8 blocks."""
    height, width, channels = pixels.shape
    rows, cols = height // _BLOCK, width // _BLOCK
    blocks = pixels[: rows * _BLOCK, : cols * _BLOCK].reshape(rows, _BLOCK, cols, _BLOCK, channels)
    blocks = blocks.transpose(0, 2, 4, 1, 3)  # (rows, cols, C, 8, 8)
    return _DCT @ blocks @ _DCT.T


def _block_idct(coefficients: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` with its full blocks replaced by the inverse DCT of ``coefficients``; the
    edge rows and columns outside full blocks stay as they are."""
    rows, cols, channels = coefficients.shape[:3]
    blocks = (_DCT.T @ coefficients @ _DCT).transpose(0, 3, 1, 4, 2)  # (rows, 8, cols, 8, C)
    out = pixels.copy()
    out[: rows * _BLOCK, : cols * _BLOCK] = blocks.reshape(rows * _BLOCK, cols * _BLOCK, channels)
    return out
