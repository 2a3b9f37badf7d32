"""The video stages against ``WanPipeline`` and ``WanImageToVideoPipeline`` called directly on
tiny Wan bundles: the staged video (encoders -> denoiser -> decoder) equals the pipeline's for
the same prompt, image, seed, steps and guidance; the denoiser stops wherever its caller stops
iterating; MP4 encoding, which keeps the invisible watermark of every frame."""

import io
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image

from actors.video import (
    VideoDecoder,
    VideoDenoiser,
    VideoDenoiseRequest,
    VideoImageEncoder,
    VideoPromptEncoder,
    encode_mp4,
    to_uint8,
)
from actors.watermark import detect_watermark, embed_watermark
from flows.models import build_tiny_bundles
from tests.actors.rows import image_pixels

HEIGHT, WIDTH, NUM_FRAMES = 32, 48, 5
NUM_STEPS = 3
MAX_SEQUENCE_LENGTH = 16
TOLERANCE = 1e-4
PROMPT = "a red car driving through the city at night"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2v", "i2v"])


@pytest.fixture(scope="module")
def bundle(bundles: dict[str, Path]) -> Path:
    return bundles["t2v"]


@pytest.fixture(scope="module")
def stages(bundle: Path) -> tuple[VideoPromptEncoder, VideoDenoiser, VideoDecoder]:
    return VideoPromptEncoder(bundle), VideoDenoiser(bundle), VideoDecoder(bundle)


def staged_video(stages, seed: int, guidance_scale: float, negative: str | None) -> np.ndarray:
    encoder, denoiser, decoder = stages
    embeddings = encoder.encode(PROMPT, negative, guidance_scale, MAX_SEQUENCE_LENGTH)
    request = VideoDenoiseRequest(
        embeddings=embeddings,
        seed=seed,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance_scale,
    )
    return decoder.decode(denoiser.denoise(request))


def pipeline_video(
    pipeline: type, bundle: Path, guidance_scale: float, negative: str | None, **inputs
) -> np.ndarray:
    """(F, H, W, 3) frames of the test's video, seed 7, from the diffusers pipeline itself."""
    pipe = pipeline.from_pretrained(bundle)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=PROMPT,
        negative_prompt=negative,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(7),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
        **inputs,
    ).frames[0]


@pytest.mark.parametrize(
    ("guidance_scale", "negative"), [(5.0, "blurry, static"), (5.0, None), (1.0, None)]
)
def test_staged_video_equals_the_pipeline(bundle, stages, guidance_scale, negative):
    expected = pipeline_video(WanPipeline, bundle, guidance_scale, negative)
    video = staged_video(stages, 7, guidance_scale, negative)
    assert video.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    diff = float(np.abs(video - expected).max())
    print(f"max abs diff (guidance {guidance_scale}, negative {negative!r}): {diff:.3g}")
    assert diff <= TOLERANCE
    # Not a constant video: the comparison above has something to compare.
    assert video.std() > 1e-3


# An image of another size and aspect than the video: both the pipeline and the stages resize
# it (the CLIP processor to its crop, the VAE's input to the video's size).
@pytest.mark.parametrize(("guidance_scale", "negative"), [(5.0, "blurry"), (1.0, None)])
def test_staged_image_to_video_equals_the_pipeline(bundles, guidance_scale, negative):
    image = Image.fromarray(image_pixels(52, 40, seed=0))  # (40, 52) pixels
    expected = pipeline_video(
        WanImageToVideoPipeline, bundles["i2v"], guidance_scale, negative, image=image
    )

    encoder, denoiser = VideoPromptEncoder(bundles["i2v"]), VideoDenoiser(bundles["i2v"])
    conditioning = VideoImageEncoder(bundles["i2v"]).encode(image, HEIGHT, WIDTH, NUM_FRAMES)
    # 17 CLIP tokens of width 16; a mask of 4 channels then 16 latent channels, 2 latent frames.
    assert conditioning.image_embeds.shape == (17, 16)
    assert conditioning.condition.shape == (20, 2, HEIGHT // 8, WIDTH // 8)
    request = VideoDenoiseRequest(
        embeddings=encoder.encode(PROMPT, negative, guidance_scale, MAX_SEQUENCE_LENGTH),
        seed=7,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance_scale,
        image=conditioning,
    )
    video = VideoDecoder(bundles["i2v"]).decode(denoiser.denoise(request))
    diff = float(np.abs(video - expected).max())
    print(f"image-to-video max abs diff (guidance {guidance_scale}): {diff:.3g}")
    assert video.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3) and diff <= TOLERANCE
    assert video.std() > 1e-3

    # The image matters: another picture gives another video from the same seed.
    other = VideoImageEncoder(bundles["i2v"]).encode(
        Image.fromarray(image_pixels(52, 40, seed=1)), HEIGHT, WIDTH, NUM_FRAMES
    )
    moved = denoiser.denoise(VideoDenoiseRequest(**{**vars(request), "image": other}))
    assert float((moved - denoiser.denoise(request)).abs().max()) > 1e-3


def test_an_image_is_required_by_image_to_video_and_refused_by_text_to_video(bundles, stages):
    denoiser = VideoDenoiser(bundles["i2v"])
    with pytest.raises(ValueError, match="WanImageToVideoPipeline animates an input image"):
        denoiser.check(HEIGHT, WIDTH, NUM_FRAMES, image=False)
    with pytest.raises(ValueError, match="WanPipeline makes videos from text alone"):
        stages[1].check(HEIGHT, WIDTH, NUM_FRAMES, image=True)
    with pytest.raises(ValueError, match="WanPipeline takes no image"):
        VideoImageEncoder(bundles["t2v"])


def test_a_wan_22_layout_is_refused_naming_it(bundles, tmp_path):
    for key, value in (("boundary_ratio", 0.9), ("expand_timesteps", True)):
        bundle = shutil.copytree(bundles["i2v"], tmp_path / key)
        index = json.loads((bundle / "model_index.json").read_text())
        (bundle / "model_index.json").write_text(json.dumps({**index, key: value}))
        with pytest.raises(ValueError, match=f"a Wan 2.2 layout \\({key} set\\)"):
            VideoDenoiser(bundle)
        with pytest.raises(ValueError, match="Wan 2.2 layout"):
            VideoImageEncoder(bundle)


def test_denoiser_yields_progress_and_stops_between_steps(stages):
    encoder, denoiser, _ = stages
    request = VideoDenoiseRequest(
        embeddings=encoder.encode(PROMPT, None, 5.0, MAX_SEQUENCE_LENGTH),
        seed=1,
        height=HEIGHT,
        width=WIDTH,
        num_frames=NUM_FRAMES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=5.0,
    )
    progress = [(step, latents is None) for step, latents in denoiser.steps(request)]
    assert progress == [(1, True), (2, True), (3, False)]
    steps = denoiser.steps(request)
    assert next(steps)[0] == 1
    steps.close()  # the caller stopping: no further transformer call runs


@pytest.mark.parametrize(
    ("height", "width", "num_frames", "message"),
    [(24, 48, 5, "multiples of 16"), (32, 48, 6, "num_frames - 1 must be a multiple of 4")],
)
def test_denoiser_rejects_shapes_the_vae_cannot_hold(stages, height, width, num_frames, message):
    with pytest.raises(ValueError, match=message):
        stages[1].check(height, width, num_frames)


def test_encode_mp4_round_trips_frame_count_and_size():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(NUM_FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    data = encode_mp4(frames, fps=8)
    with av.open(io.BytesIO(data)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert container.streams.video[0].average_rate == 8
    assert len(decoded) == NUM_FRAMES
    assert decoded[0].shape == (HEIGHT, WIDTH, 3)
    flat = np.full((NUM_FRAMES, HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    with av.open(io.BytesIO(encode_mp4(flat, fps=8))) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(first.astype(int) - 128).max() <= 2
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(frames.astype(np.float32), fps=8)


def test_encode_mp4_keeps_the_watermark_of_every_frame(stages):
    # The tiny model's frames are the hard case: 32x48 gives each watermark bit few
    # coefficients, and they are full of high-frequency colour.
    frames = to_uint8(staged_video(stages, 3, 5.0, None))  # (F, H, W, 3)
    marked = np.stack([embed_watermark(frame, "k") for frame in frames])
    with av.open(io.BytesIO(encode_mp4(marked, fps=8))) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    readings = [detect_watermark(frame, "k") for frame in decoded]
    print("watermark bits per MP4 frame:", [reading.matched_bits for reading in readings])
    assert all(reading.present for reading in readings)
    assert not any(detect_watermark(frame, "another key").present for frame in decoded)
    # Watermark and H.264 together stay invisible.
    psnr = 10 * np.log10(255**2 / np.mean((decoded.astype(np.float64) - frames) ** 2))
    print(f"PSNR of the MP4 to the unmarked frames: {psnr:.1f} dB")
    assert psnr > 40
