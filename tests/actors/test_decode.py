"""MediaDecoder and bucketing: every broken file gets its reason, odd images come out RGB,
videos split into clips at shots, and the columns survive a real Ray Data pipeline."""

import math
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image, features

from actors.decode import (
    DECODE_COLUMNS,
    EMPTY_PIXELS,
    MediaDecoder,
    buckets,
    center_crop_box,
    nearest_bucket,
    resize_and_crop,
)
from actors.sources import FetchMedia, list_inputs
from cluster.storage import Storage
from flows.samples import build_broken_files, build_sample_corpus, write_frames
from schemas.config import BucketConfig, PrepConfig
from schemas.errors import RaygenError
from schemas.shards import BucketKey

RED, BLUE = (255, 0, 0), (0, 0, 255)
# What prep's preflight reads from the tiny bundles (VAE downscale 8 x patch 2); these tests
# decode without bundles.
STEP = 16


def prep_config(**config) -> PrepConfig:
    return PrepConfig(**{"buckets": {"step": STEP}, **config})


def item_batch(items: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.array([item[key] for item in items], dtype=object) for key in items[0]}


def decode_folder(folder: Path, **config) -> dict[str, dict]:
    """Fetch + decode every input under ``folder``; rows keyed by file name (a clip: "name-cK")."""
    prep = prep_config(input=str(folder), **config)
    fetched = FetchMedia(prep.decode, prep.storage)(item_batch(list_inputs(prep, Storage())))
    decoded = MediaDecoder(prep.decode, prep.buckets)(fetched)
    rows = {}
    for index, (uri, sample_id) in enumerate(
        zip(decoded["source_uri"], decoded["sample_id"], strict=True)
    ):
        clip = sample_id.rpartition("-")[2] if "-" in sample_id else ""
        name = Path(uri).name + (f"-{clip}" if clip else "")
        rows[name] = {column: values[index] for column, values in decoded.items()}
    return rows


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> tuple[dict[str, str], dict[str, dict]]:
    root = tmp_path_factory.mktemp("broken")
    expected = build_broken_files(root)
    return expected, decode_folder(root)


def write_two_shots(path: Path, num_frames: int, fps: int) -> None:
    frames = np.zeros((num_frames, 48, 64, 3), dtype=np.uint8)  # (F, H, W, 3)
    frames[: num_frames // 2] = RED
    frames[num_frames // 2 :] = BLUE
    write_frames(path, frames, fps)


# ---- buckets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        BucketConfig(step=STEP),
        BucketConfig(resolution=1024, step=64),
        BucketConfig(resolution=512, step=16, max_aspect=3.0),
        BucketConfig(resolution=256, step=32),
    ],
)
def test_buckets_are_step_multiples_of_about_the_target_area(config):
    found = buckets(config)
    assert found == sorted(set(found))
    for width, height in found:
        assert width % config.step == 0 and height % config.step == 0
        # Rounding one side to a multiple of step moves the area by at most step/2 per row.
        assert abs(width * height - config.resolution**2) <= config.resolution * config.step / 2
        assert max(width / height, height / width) <= config.max_aspect
        assert (height, width) in found  # portrait and landscape alike
    assert (config.resolution, config.resolution) in found


def test_bucket_values_and_impossible_settings():
    assert buckets(BucketConfig(step=STEP)) == [(48, 80), (64, 64), (80, 48)]
    assert (1344, 768) in buckets(BucketConfig(resolution=1024, step=64))  # SDXL's own
    with pytest.raises(RaygenError, match="no bucket"):
        buckets(BucketConfig(resolution=8, step=16))
    with pytest.raises(RaygenError, match="buckets.step: null"):
        buckets(BucketConfig())  # prep's preflight sets it from the bundles


def test_nearest_bucket_and_center_crop_on_a_known_case():
    options = buckets(BucketConfig(step=STEP))
    assert nearest_bucket(128, 64, options) == (80, 48)
    assert nearest_bucket(64, 128, options) == (48, 80)
    assert nearest_bucket(70, 64, options) == (64, 64)
    # 128x64 covering 80x48: scale 0.75, a 107x64 window centered at x=10.
    image = np.zeros((64, 128, 3), dtype=np.uint8)  # (H, W, 3)
    image[:, :10] = RED
    image[:, 10:117] = (0, 255, 0)
    image[:, 117:] = BLUE
    pixels, crop_box = resize_and_crop(Image.fromarray(image), (80, 48))
    assert crop_box == (0, 10, 64, 107)
    assert pixels.shape == (48, 80, 3) and pixels.dtype == np.uint8
    # Only the green band is inside the crop; bicubic may bleed a little at the very edges.
    assert (np.abs(pixels[:, 2:-2].astype(int) - (0, 255, 0)) <= 2).all()
    # The crop's aspect ratio is the bucket's, to within a pixel.
    top, left, height, width = center_crop_box((1000, 872), (64, 64))
    assert (top, left, height, width) == (0, 64, 872, 872)
    assert math.isclose(width / height, 64 / 64)


def test_non_square_buckets_are_named_height_by_width(tmp_path):
    """A wide image lands in a wide bucket whose name reads like its pixels' (H, W)."""
    Image.new("RGB", (128, 64), RED).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 128), BLUE).save(tmp_path / "tall.png")
    rows = decode_folder(tmp_path)
    assert rows["wide.png"]["pixels"].shape == (1, 48, 80, 3)  # (F, H, W, 3)
    assert rows["wide.png"]["bucket"] == "48x80"
    assert BucketKey.parse(rows["wide.png"]["bucket"]) == BucketKey(height=48, width=80)
    assert rows["tall.png"]["pixels"].shape == (1, 80, 48, 3)
    assert rows["tall.png"]["bucket"] == "80x48"


# ---- images ------------------------------------------------------------------------------


def test_every_broken_file_gets_its_reason_and_the_unusual_ones_decode(broken):
    expected, rows = broken
    assert set(rows) == set(expected)
    for name, reason in expected.items():
        row = rows[name]
        assert row["reason"] == (reason or ""), (name, row["detail"])
        assert row["status"] == ("quarantined" if reason else "ok"), name
        if reason:
            assert row["pixels"].shape == EMPTY_PIXELS.shape and row["bucket"] == ""
            assert row["detail"], name
        else:
            assert row["pixels"].dtype == np.uint8 and row["pixels"].shape[0] == 1
            _, height, width, _ = row["pixels"].shape
            assert BucketKey.parse(row["bucket"]) == BucketKey(height=height, width=width)
    assert "decode.min_side" in rows["broken_tiny.png"]["detail"]


def _halves(pixels: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the first and last quarter of (H, W, 3) pixels along ``axis``."""
    size = pixels.shape[axis]
    first = np.take(pixels, range(size // 4), axis=axis)
    last = np.take(pixels, range(size - size // 4, size), axis=axis)
    return first.reshape(-1, 3).mean(0), last.reshape(-1, 3).mean(0)


def test_unusual_modes_come_out_rgb_with_their_colours(broken):
    _, rows = broken
    colours = {name: rows[name]["pixels"][0] for name in rows if name.startswith("unusual")}
    np.testing.assert_allclose(colours["unusual_cmyk.jpg"].reshape(-1, 3).mean(0), RED, atol=8)
    # 16-bit grey scaled (0x4000 -> 64, 0xC000 -> 192), not clipped to white.
    left, right = _halves(colours["unusual_16bit.png"], axis=1)
    np.testing.assert_allclose(left, (64,) * 3, atol=2)
    np.testing.assert_allclose(right, (192,) * 3, atol=2)
    # Transparent pixels over white; opaque ones keep their colour.
    left, right = _halves(colours["unusual_palette_alpha.png"], axis=1)
    np.testing.assert_allclose(left, (255, 255, 255), atol=2)
    np.testing.assert_allclose(right, BLUE, atol=2)
    left, right = _halves(colours["unusual_rgba.png"], axis=1)
    np.testing.assert_allclose(left, (255, 255, 255), atol=2)
    np.testing.assert_allclose(right, (0, 128, 0), atol=2)
    # An animated GIF gives its first frame (red | blue), not the second (green).
    left, right = _halves(colours["unusual_animation.gif"], axis=1)
    np.testing.assert_allclose(left, RED, atol=2)
    np.testing.assert_allclose(right, BLUE, atol=2)


def test_exif_orientation_is_applied(broken):
    _, rows = broken
    row = rows["unusual_exif_rotated.jpg"]
    # Stored 48x32 landscape, left red / right blue; displayed portrait, red on top.
    assert (row["original_width"], row["original_height"]) == (32, 48)
    pixels = row["pixels"][0]  # (H, W, 3)
    assert pixels.shape[0] > pixels.shape[1]
    top, bottom = _halves(pixels, axis=0)
    np.testing.assert_allclose(top, RED, atol=12)
    np.testing.assert_allclose(bottom, BLUE, atol=12)


def _red_blue(mode: str = "RGB") -> Image.Image:
    """48x32, left half red, right half blue, converted to ``mode``."""
    image = Image.new("RGB", (48, 32), RED)
    image.paste(BLUE, (24, 0, 48, 32))
    return image.convert(mode)


def _palette_red_blue(transparent_left: bool = False) -> Image.Image:
    image = Image.new("P", (48, 32), 0)
    image.paste(1, (24, 0, 48, 32))
    image.putpalette([*RED, *BLUE, 0, 255, 0])
    if transparent_left:
        image.info["transparency"] = 0
    return image


def _grey16(mode: str = "I;16") -> Image.Image:
    grey = np.full((32, 48), 0x4000, dtype=np.uint16)  # (H, W): 64 of 255 in 8 bits
    grey[:, 24:] = 0xC000  # 192
    return Image.fromarray(grey).convert(mode) if mode != "I;16" else Image.fromarray(grey)


def _alpha_left(mode: str) -> Image.Image:
    """Left half fully transparent (its colour red), right half opaque blue."""
    image = _red_blue("RGBA")
    image.paste((255, 0, 0, 0), (0, 0, 24, 32))
    return image.convert(mode)


WHITE, GREY = (255, 255, 255), (29, 29, 29)  # GREY: ITU-R 601 luma of pure blue
# file name -> (image, save options, expected mean colour of the left and right quarters,
# tolerance): real files written by PIL, each decoded through FetchMedia + MediaDecoder.
FORMAT_CASES = {
    "palette.gif": (_palette_red_blue(), {}, RED, BLUE, 2),
    "transparent.gif": (_palette_red_blue(transparent_left=True), {}, WHITE, BLUE, 2),
    "animated.gif": (
        _palette_red_blue(),
        {"save_all": True, "append_images": [Image.new("P", (48, 32), 2)], "duration": 100},
        RED,
        BLUE,
        2,
    ),
    "rgb.bmp": (_red_blue(), {}, RED, BLUE, 2),
    "palette.bmp": (_red_blue().quantize(4), {}, RED, BLUE, 2),
    "bilevel.bmp": (_red_blue("L").point(lambda v: 255 * (v > 50)).convert("1"), {}, WHITE, (0,) * 3, 2),
    "rgb.tiff": (_red_blue(), {}, RED, BLUE, 2),
    "cmyk.tiff": (_red_blue("CMYK"), {}, RED, BLUE, 2),
    "grey16.tiff": (_grey16(), {}, (64,) * 3, (192,) * 3, 2),
    "la.tiff": (_alpha_left("LA"), {}, WHITE, GREY, 2),
    "rgba.tiff": (_alpha_left("RGBA"), {"compression": "tiff_lzw"}, WHITE, BLUE, 2),
    "grey16.pgm": (_grey16("I"), {}, (64,) * 3, (192,) * 3, 2),
    "la.png": (_alpha_left("LA"), {}, WHITE, GREY, 2),
    "rgba.webp": (_alpha_left("RGBA"), {"lossless": True}, WHITE, BLUE, 2),
    "rgb.tga": (_red_blue(), {}, RED, BLUE, 2),
}
if features.check("avif"):  # where Pillow has its AVIF plugin
    FORMAT_CASES["rgb.avif"] = (_red_blue(), {"quality": 90}, RED, BLUE, 24)
    FORMAT_CASES["rgba.avif"] = (_alpha_left("RGBA"), {"quality": 90}, WHITE, BLUE, 24)


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("formats")
    for name, (image, options, *_) in FORMAT_CASES.items():
        image.save(root / name, **options)
    return decode_folder(root)


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_every_format_pil_reads_decodes_to_rgb_with_its_colours(formats, name):
    image, _, left_colour, right_colour, atol = FORMAT_CASES[name]
    row = formats[name]
    assert (row["status"], row["reason"]) == ("ok", ""), row["detail"]
    assert (row["original_width"], row["original_height"]) == image.size
    pixels = row["pixels"][0]  # (H, W, 3)
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 80, 3)  # the 80x48 bucket
    left, right = _halves(pixels, axis=1)
    np.testing.assert_allclose(left, left_colour, atol=atol)
    np.testing.assert_allclose(right, right_colour, atol=atol)


def test_corrupt_files_of_every_format_are_quarantined_with_a_reason(tmp_path):
    expected = {}
    for name in ("palette.gif", "rgb.bmp", "rgb.tiff", "rgba.webp", "rgb.avif", "rgb.tga"):
        if name not in FORMAT_CASES:
            continue
        image, options, *_ = FORMAT_CASES[name]
        image.save(tmp_path / name, **options)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).unlink()
        stem, suffix = name.split(".")
        (tmp_path / f"cut_{stem}.{suffix}").write_bytes(data[: len(data) // 2])
        (tmp_path / f"noise_{stem}.{suffix}").write_bytes(np.random.default_rng(0).bytes(2048))
        # GIF, BMP, TIFF and TGA decoders say when data ends early; WebP's and AVIF's
        # libraries only that they cannot decode it.
        expected[f"cut_{stem}.{suffix}"] = "corrupt" if suffix in ("webp", "avif") else "truncated"
        expected[f"noise_{stem}.{suffix}"] = "corrupt"
    rows = decode_folder(tmp_path)
    assert {name: row["reason"] for name, row in rows.items()} == expected
    assert all(row["status"] == "quarantined" and row["detail"] for row in rows.values())


def test_decompression_bomb_limit_comes_from_config(tmp_path):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "big.png")
    rows = decode_folder(tmp_path, decode={"max_pixels": 64 * 64 - 1})
    assert rows["big.png"]["reason"] == "decompression_bomb"
    assert "decode.max_pixels" in rows["big.png"]["detail"]


# ---- video -------------------------------------------------------------------------------


def test_video_sampled_at_target_fps_into_fixed_windows(tmp_path):
    # 24 fps, brightness = 4 * frame index: sampling at 8 fps keeps every third frame.
    frames = np.repeat(np.arange(0, 4 * 48, 4, dtype=np.uint8), 48 * 64 * 3)
    write_frames(tmp_path / "ramp.mp4", frames.reshape(48, 48, 64, 3), fps=24)
    (tmp_path / "ramp.txt").write_text("a fading screen\n")
    rows = decode_folder(tmp_path, decode={"video_num_frames": 5, "video_max_clips": 4})
    # 16 sampled frames (0, 3, ..., 45) -> 3 windows of 5, the last frame left over.
    assert sorted(rows) == ["ramp.mp4-c0", "ramp.mp4-c1", "ramp.mp4-c2"]
    for clip in range(3):
        row = rows[f"ramp.mp4-c{clip}"]
        assert row["pixels"].shape == (5, 48, 80, 3) and row["bucket"] == "5x48x80"
        assert (row["original_width"], row["original_height"]) == (64, 48)
        assert tuple(row["crop_box"]) == (5, 0, 38, 64)
        assert row["source_rows"] == 3 and row["caption_original"] == "a fading screen"
        indices = 15 * clip + 3 * np.arange(5)
        np.testing.assert_allclose(row["pixels"].mean(axis=(1, 2, 3)), 4 * indices, atol=3)


def test_video_clips_are_capped_and_short_videos_quarantined(tmp_path):
    write_frames(tmp_path / "long.mp4", np.zeros((40, 32, 32, 3), dtype=np.uint8), fps=8)
    rows = decode_folder(tmp_path, decode={"video_num_frames": 5, "video_max_clips": 2})
    assert sorted(rows) == ["long.mp4-c0", "long.mp4-c1"]
    rows = decode_folder(tmp_path, decode={"video_num_frames": 41})
    assert rows["long.mp4"]["reason"] == "too_short"


def test_shot_boundary_starts_a_new_clip(tmp_path):
    write_two_shots(tmp_path / "cut.mp4", num_frames=18, fps=8)
    rows = decode_folder(tmp_path, decode={"video_num_frames": 5})
    # 9 red then 9 blue: one clip per shot; fixed windows would give a red/blue clip c1.
    assert sorted(rows) == ["cut.mp4-c0", "cut.mp4-c1"]
    np.testing.assert_allclose(rows["cut.mp4-c0"]["pixels"].reshape(-1, 3).mean(0), RED, atol=8)
    np.testing.assert_allclose(rows["cut.mp4-c1"]["pixels"].reshape(-1, 3).mean(0), BLUE, atol=8)
    # With a threshold above the cut, the same video splits into fixed windows.
    rows = decode_folder(tmp_path, decode={"video_num_frames": 5, "shot_threshold": 1.0})
    assert sorted(rows) == ["cut.mp4-c0", "cut.mp4-c1", "cut.mp4-c2"]
    mixed = rows["cut.mp4-c1"]["pixels"]  # sampled frames 5..9: 4 red, 1 blue
    assert mixed[0, ..., 0].mean() > 200 and mixed[-1, ..., 2].mean() > 200


# ---- the batch contract, plain and through Ray Data -------------------------------------


def test_fetch_reasons_and_extra_columns_pass_through(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    prep = prep_config(input=str(tmp_path))
    fetched = FetchMedia(prep.decode, prep.storage)(item_batch(list_inputs(prep, Storage())))
    fetched = {name: np.concatenate([values, values]) for name, values in fetched.items()}
    fetched["reason"][1], fetched["detail"][1] = "too_large", "too many bytes"
    fetched["seconds_fetch"] = np.array([0.5, 0.25])
    decoded = MediaDecoder(prep.decode, prep.buckets)(fetched)
    assert list(decoded["status"]) == ["ok", "quarantined"]
    assert list(decoded["reason"]) == ["", "too_large"]
    assert decoded["detail"][1] == "too many bytes"
    assert decoded["seconds_fetch"].tolist() == [0.5, 0.25]
    assert "data" not in decoded and set(DECODE_COLUMNS) <= set(decoded)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build_sample_corpus(root, num_videos=2)
    write_two_shots(root / "cut.mp4", num_frames=18, fps=8)
    return root


def test_columns_survive_a_ray_data_pipeline(corpus, ray_local):
    prep = prep_config(input=str(corpus), decode={"video_num_frames": 5})
    items = list_inputs(prep, Storage())
    fetch_kwargs = {"config": prep.decode, "storage": prep.storage}
    decode_kwargs = {"config": prep.decode, "bucket_config": prep.buckets}
    expected = MediaDecoder(**decode_kwargs)(FetchMedia(**fetch_kwargs)(item_batch(items)))

    # Small batches make blocks whose captions are all None, which Ray hands to the next
    # stage as float NaN: both stages must still read them as "no caption".
    actors = ray.data.ActorPoolStrategy(size=1)
    ds = (
        ray.data.from_items(items)
        .map_batches(
            FetchMedia,
            fn_constructor_kwargs=fetch_kwargs,
            compute=actors,
            batch_size=2,
            batch_format="numpy",
        )
        .map_batches(
            MediaDecoder,
            fn_constructor_kwargs=decode_kwargs,
            compute=actors,
            batch_size=1,
            batch_format="numpy",
        )
    )
    rows = {row["sample_id"]: row for row in ds.take_all()}
    assert sorted(rows) == sorted(expected["sample_id"])
    statuses = set(expected["status"])
    assert statuses == {"ok", "quarantined"}
    assert {str(kind) for kind in expected["media_kind"]} == {"image", "video", "unknown"}
    for index, sample_id in enumerate(expected["sample_id"]):
        row = rows[sample_id]
        pixels = row["pixels"]
        assert pixels.dtype == np.uint8 and pixels.ndim == 4
        np.testing.assert_array_equal(pixels, expected["pixels"][index])
        np.testing.assert_array_equal(row["crop_box"], expected["crop_box"][index])
        for name in ("original_height", "original_width", "source_rows", "item_sources"):
            assert row[name] == expected[name][index], name
        for name in (
            "source_uri",
            "item_uri",
            "media_kind",
            "caption_original",
            "bucket",
            "status",
            "reason",
            "detail",
        ):
            assert row[name] == expected[name][index], name
    captions = [row["caption_original"] for row in rows.values()]
    assert None in captions and any(isinstance(c, str) for c in captions)
