"""`raygen vae`: the tiny SD3 bundle's VAE trained with Ray Train (2 workers) on a shapes
corpus that Ray Data decodes with prep's stages; the exported bundle loads in plain diffusers,
reconstructs held-out images far better than before, and its latent factors normalise its
latents on the corpus."""

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from PIL import Image

from cluster.storage import Storage
from flows.autoencoder import PixelStream, plan_pixels, run_autoencoder, to_model_pixels
from flows.shapes import MEDIA_DIR, build_shapes_corpus
from schemas.config import AutoencoderConfig, ConfigError, load_config

SIDE = 32


def _config(bundles, corpus: Path, output: Path, **values) -> AutoencoderConfig:
    defaults = {
        "data": str(corpus),
        "output": str(output),
        "bundle.uri": str(bundles["t2i"]),
        "resolution": SIDE,
        "num_workers": 2,
        "batch_size": 16,
        "max_steps": 40,
        "checkpoint_every": 20,
        "sample_every": 40,
    }
    return load_config(AutoencoderConfig, values={**defaults, **values})


def _held_out(tmp_path: Path) -> torch.Tensor:
    build_shapes_corpus(tmp_path / "held-out", count=32, size=SIDE, seed=1)
    files = sorted((tmp_path / "held-out" / MEDIA_DIR).glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(path)) for path in files])  # (N, H, W, 3)
    return to_model_pixels(pixels, torch.device("cpu"))  # (N, 3, H, W) in [-1, 1]


@torch.no_grad()
def _reconstruction_mse(vae: AutoencoderKL, x: torch.Tensor) -> float:
    rebuilt = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return float(((rebuilt - x) ** 2).mean())


@pytest.mark.slow
def test_trained_vae_reconstructs_held_out_images_and_loads_in_diffusers(
    ray_local, tiny_bundles, tmp_path
):
    build_shapes_corpus(tmp_path / "shapes", count=96, size=SIDE, seed=0)
    output = tmp_path / "run"
    config = _config(tiny_bundles, tmp_path / "shapes" / MEDIA_DIR, output)
    result = run_autoencoder(config)
    assert result.steps == 40

    held_out = _held_out(tmp_path)
    before = AutoencoderKL.from_pretrained(tiny_bundles["t2i"], subfolder="vae")
    after = AutoencoderKL.from_pretrained(output / "bundle", subfolder="vae")
    mse_before, mse_after = (
        _reconstruction_mse(before, held_out),
        _reconstruction_mse(after, held_out),
    )
    print(f"held-out reconstruction MSE: untrained {mse_before:.4f}, trained {mse_after:.4f}")
    assert mse_after < 0.4 * mse_before

    # Its factors bring its latents on the corpus to zero mean and unit variance (SD3's rule).
    plan = plan_pixels(config.model_copy(update={"output": str(tmp_path / "other")}), Storage())
    with torch.no_grad():
        latents = after.encode(to_model_pixels(plan.samples["pixels"], torch.device("cpu")))
    scaled = (latents.latent_dist.mean - after.config.shift_factor) * after.config.scaling_factor
    assert abs(float(scaled.mean())) < 1e-3 and float(scaled.std()) == pytest.approx(1, abs=1e-3)
    assert after.config.scaling_factor != before.config.scaling_factor

    # The bundle is the source bundle with this VAE: SD3's pipeline loads and runs it.
    pipe = StableDiffusion3Pipeline.from_pretrained(output / "bundle")
    image = pipe(
        "a red circle on the left", num_inference_steps=2, height=SIDE, width=SIDE,
        output_type="np", generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all()

    # Progress as for the DiT: the reconstruction error falls; a grid of originals over
    # reconstructions; checkpoints that --resume continues.
    lines = (output / "metrics.jsonl").read_text().splitlines()
    mse = [json.loads(line)["reconstruction_mse"] for line in lines]
    assert len(mse) == 40 and np.mean(mse[-5:]) < 0.5 * np.mean(mse[:5])
    grid = Image.open(output / "samples" / "step-0000040.png")
    assert grid.size == (config.num_samples * SIDE, 2 * SIDE)
    assert any(p.name.startswith("checkpoint") for p in (output / "ray-train").iterdir())


def test_config_mistakes_name_the_field(tiny_bundles, tmp_path):
    build_shapes_corpus(tmp_path / "shapes", count=4, size=SIDE, seed=0)
    corpus = tmp_path / "shapes" / MEDIA_DIR
    cases = [
        ({"resolution": 36}, "resolution: 36 is not a multiple of the VAE's downscale 8"),
        ({"bundle.uri": str(tiny_bundles["t2v"])}, "bundle: "),
        ({"vae_config": {"latent_channels": 4}}, "vae_config: only used with init: scratch"),
        ({"batch_size": 3}, "batch_size: 3 must be a multiple"),
        ({"parallelism": "fsdp"}, "parallelism: "),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
            plan_pixels(_config(tiny_bundles, corpus, tmp_path / "run", **values), Storage())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"^data: none of the first 1 inputs .* \(corrupt\)"):
        plan_pixels(_config(tiny_bundles, broken, tmp_path / "run"), Storage())


def test_a_seeked_stream_continues_with_the_batches_an_uninterrupted_one_draws(ray_local):
    rows = [{"pixels": np.full((2, 2, 3), index, dtype=np.uint8)} for index in range(10)]
    dataset = ray.data.from_items(rows)

    def draws(stream, count):
        return [int(next(stream)["pixels"][0, 0, 0, 0]) for _ in range(count)]

    stream = PixelStream(dataset.iterator(), batch_size=3, seed=0, shuffle_buffer=0)
    first = draws(stream, 7)  # 3 batches an epoch (drop_last): two epochs and one more
    assert stream.epoch == 2 and stream.position == 1
    resumed = PixelStream(dataset.iterator(), batch_size=3, seed=0, shuffle_buffer=0)
    resumed.seek(1, 2)
    assert draws(resumed, 2) == first[5:7] and (resumed.epoch, resumed.position) == (2, 1)
