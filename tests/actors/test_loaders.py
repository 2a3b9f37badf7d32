"""Bundles load through `ModelRef` from a local folder and from s3:// (loopback S3 server)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipProcessor

from actors.loaders import load_component_config, load_model, load_pipeline, load_processor
from cluster.storage import Storage
from flows.models import build_tiny_bundles
from schemas.config import ModelRef


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), names=["t2i", "captioner"])


def _generate(pipe) -> np.ndarray:
    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def test_local_and_s3_bundles_generate_the_same_image(bundles, s3_bucket, storage_config):
    uri = f"{s3_bucket}/models/t2i"
    Storage(storage_config).upload_dir(bundles["t2i"], uri)

    local = load_pipeline(
        ModelRef(uri=str(bundles["t2i"])), storage_config, StableDiffusion3Pipeline
    )
    remote = load_pipeline(ModelRef(uri=uri), storage_config, StableDiffusion3Pipeline)

    assert isinstance(remote, StableDiffusion3Pipeline)
    # Downloaded once, into the content-keyed cache.
    assert len(list(Path(storage_config.cache_dir).glob("bundles/t2i-*"))) == 1
    np.testing.assert_array_equal(_generate(local), _generate(remote))


def test_transformers_bundle_from_s3(bundles, s3_bucket, storage_config):
    uri = f"{s3_bucket}/models/captioner"
    Storage(storage_config).upload_dir(bundles["captioner"], uri)
    model = load_model(ModelRef(uri=uri), BlipForConditionalGeneration, storage_config)
    processor = AutoProcessor.from_pretrained(bundles["captioner"])
    inputs = processor(images=Image.new("RGB", (40, 30), "red"), return_tensors="pt")
    captions = processor.batch_decode(
        model.generate(**inputs, max_new_tokens=4), skip_special_tokens=True
    )
    assert len(captions) == 1 and isinstance(captions[0], str)
    assert not model.training


def test_dtype_and_device_come_from_the_ref(bundles):
    pipe = load_pipeline(
        ModelRef(uri=str(bundles["t2i"]), dtype="bfloat16"), None, StableDiffusion3Pipeline
    )
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.device.type == "cpu"


def test_processor_and_component_config_load_without_weights(bundles):
    processor = load_processor(ModelRef(uri=str(bundles["captioner"])), AutoProcessor)
    assert isinstance(processor, BlipProcessor)

    config = load_component_config(ModelRef(uri=str(bundles["t2i"])), AutoencoderKL, None, "vae")
    vae = AutoencoderKL.from_pretrained(bundles["t2i"], subfolder="vae")
    assert config["scaling_factor"] == vae.config.scaling_factor
    assert config["latent_channels"] == vae.config.latent_channels
