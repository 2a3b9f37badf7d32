"""`raygen evaluate`: images from a bundle on Ray Data, equal to the pipeline's own for the
same seeds; prompt following read from pixels; CLIP score equal to torchmetrics' own over the
same images; a report; and clear errors for prompts and metrics."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, WanPipeline
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore

from actors.evaluation import ImageScores, clip_model_and_processor, filmstrip, png
from actors.sources import list_inputs
from cluster.storage import Storage
from flows.evaluate import read_prompts, reference_items, run_evaluate, summarize
from flows.models import build_tiny_bundles
from flows.sample import run_sample
from flows.shapes import MEDIA_DIR, build_shapes_corpus, shape_image, shape_video
from schemas.config import (
    ConfigError,
    EvaluateConfig,
    ModelRef,
    PrepConfig,
    SampleConfig,
    load_config,
)
from schemas.shapes import HELD_OUT, VIDEO_PROMPTS

PROMPTS = ["a red circle on the left", "a blue square at the top", "a photo of a cat"]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> ModelRef:
    return ModelRef(uri=str(build_tiny_bundles(tmp_path_factory.mktemp("b"), ["scorer"])["scorer"]))


def test_scores_of_renderings_and_clip_score_as_torchmetrics_computes_it(scorer):
    rng = np.random.default_rng(0)
    captions = list(HELD_OUT[:6])
    pixels = [np.asarray(shape_image(caption, 64, rng)) for caption in captions]
    prompts = [caption.text for caption in captions]
    batch = {
        "prompt": np.array(prompts, dtype=object),
        "image": np.array([png(p) for p in pixels], dtype=object),
        "frames": np.ones(len(prompts), dtype=np.int64),
    }
    scores = ImageScores(scorer, None)(batch)
    for category in ("color", "shape", "place"):
        assert list(scores[category]) == [True] * len(prompts)
    assert list(scores["direction"]) == [None] * len(prompts)  # no image prompt names one
    # The mean of the per-image scores is CLIPScore over the whole set.
    direct = CLIPScore(model_name_or_path=lambda: clip_model_and_processor(scorer))
    direct.update(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), prompts)
    assert np.mean(scores["clip_score"]) == pytest.approx(float(direct.compute()), rel=1e-5)


def test_videos_are_read_as_videos_from_their_filmstrips():
    """The generator's own motions, as BundleImages stores a video (a filmstrip PNG of its
    frames): every direction read right; an image asked for a motion is not scored."""
    rng = np.random.default_rng(0)
    videos = [shape_video(caption, 32, 9, rng) for caption in VIDEO_PROMPTS]  # (9, 32, 32, 3)
    prompts = [caption.text for caption in VIDEO_PROMPTS]
    batch = {
        "prompt": np.array([*prompts, prompts[0]], dtype=object),
        "image": np.array([png(filmstrip(v)) for v in [*videos, videos[0][:1]]], dtype=object),
        "frames": np.array([9] * len(videos) + [1], dtype=np.int64),
    }
    scores = ImageScores(None, None)(batch)
    for category in ("color", "shape", "direction"):
        assert list(scores[category]) == [True] * len(videos) + [None], category
    assert list(scores["place"]) == [None] * (len(videos) + 1)
    assert list(scores["seen_direction"][:4]) == [c.direction for c in VIDEO_PROMPTS[:4]]
    assert summarize(
        [dict(zip(scores, row, strict=True)) for row in zip(*scores.values(), strict=True)]
    )["prompt_following"] == {
        "color": 1.0,
        "shape": 1.0,
        "direction": 1.0,
        "all": 1.0,
        "images": len(videos),
    }


def test_summary_counts_shapes_prompts_only():
    rows = [
        {"color": True, "shape": True, "place": True, "clip_score": 30.0},
        {"color": True, "shape": False, "place": True, "clip_score": 20.0},
        {"color": None, "shape": None, "place": None, "clip_score": 10.0},  # another prompt
    ]
    metrics = summarize(rows)
    assert metrics["prompt_following"] == {
        "color": 1.0, "shape": 0.5, "place": 1.0, "all": 0.5, "images": 2
    }  # fmt: skip
    assert metrics["clip_score"] == {"mean": 20.0, "images": 3}


def test_prompt_and_metric_mistakes_are_named(tmp_path):
    storage = Storage()
    default = load_config(EvaluateConfig, values={"output": str(tmp_path)})
    assert read_prompts(default, storage) == [caption.text for caption in HELD_OUT]
    (tmp_path / "empty.txt").write_text("\n  \n")
    for name, message in (("empty.txt", "has no prompts"), ("missing.txt", "no file")):
        config = load_config(EvaluateConfig, values={"prompts": str(tmp_path / name)})
        with pytest.raises(ConfigError, match=f"^prompts: .*{message}"):
            read_prompts(config, storage)
    (tmp_path / "no-images").mkdir()
    config = load_config(EvaluateConfig, values={"fid.reference": str(tmp_path / "no-images")})
    with pytest.raises(ConfigError, match="^fid.reference: input .*no-images: no files found"):
        reference_items(config, storage)
    with pytest.raises(ConfigError, match="unknown metric .fid2.; known: prompt_following, clip"):
        load_config(EvaluateConfig, values={"metrics": ["prompt_following", "fid2"]})


@pytest.mark.slow
def test_evaluate_a_bundle_on_ray_data(ray_local, tiny_bundles, feature_extractor, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    build_shapes_corpus(tmp_path / "reference", count=8, size=32, seed=3)
    output = tmp_path / "eval"
    config = load_config(
        EvaluateConfig,
        values={
            "bundle.uri": str(tiny_bundles["t2i"]),
            "clip.uri": str(tiny_bundles["scorer"]),
            "prompts": str(tmp_path / "prompts.txt"),
            "seeds": 2,
            "height": 32,
            "width": 32,
            "num_inference_steps": 2,
            "max_sequence_length": 16,
            "generate.batch_size": 4,
            "fid.reference": str(tmp_path / "reference" / MEDIA_DIR),
            "fid.feature_extractor": feature_extractor,
        },
    )
    result = run_evaluate(config.model_copy(update={"output": str(output)}))
    saved = json.loads((output / "eval.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert saved["metrics"]["prompt_following"]["images"] == 4  # two shapes prompts x 2 seeds
    assert saved["metrics"]["clip_score"]["images"] == 6
    fid = saved["metrics"]["fid"]
    assert (fid["images"], fid["reference"]) == (6, 8) and np.isfinite(fid["value"])
    assert "| CLIP score |" in (output / "report.md").read_text()
    assert Image.open(output / "grid.png").size == (2 * 32, 3 * 32)

    # Each image is the pipeline's own for its seed (batched in the actor: within a level).
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_bundles["t2i"])
    for image in saved["images"]:
        expected = pipe(
            image["prompt"], height=32, width=32, num_inference_steps=2, max_sequence_length=16,
            generator=torch.Generator().manual_seed(image["seed"]), output_type="np",
        ).images[0]  # fmt: skip
        got = np.asarray(Image.open(output / image["file"])).astype(np.int16)
        assert np.abs(got - (expected * 255).round()).max() <= 1, image["file"]


@pytest.mark.slow
def test_evaluate_a_video_bundle_reads_the_direction_of_motion(ray_local, tiny_bundles, tmp_path):
    output = tmp_path / "eval"
    config = load_config(
        EvaluateConfig,
        values={
            "bundle.uri": str(tiny_bundles["t2v"]),
            "output": str(output),
            "seeds": 1,
            "height": 32,
            "width": 32,
            "num_frames": 5,
            "num_inference_steps": 2,
            "max_sequence_length": 16,
            "metrics": ["prompt_following", "fid"],
            "generate.batch_size": 6,
        },
    )
    result = run_evaluate(config)
    following = result["metrics"]["prompt_following"]
    assert sorted(following) == ["all", "color", "direction", "images", "shape"]
    assert following["images"] == len(VIDEO_PROMPTS)
    assert result["metrics"]["fid"] == {"skipped": "a video model: FID compares images"}
    assert result["media"] == "video" and result["settings"]["num_frames"] == 5
    assert "| prompt following: direction |" in (output / "report.md").read_text()
    assert Image.open(output / "grid.png").size == (5 * 32, 12 * 32)  # filmstrips, a row each

    # Each video is the pipeline's own for its seed, in the MP4 and in the filmstrip.
    pipe = WanPipeline.from_pretrained(tiny_bundles["t2v"])
    first = result["images"][0]
    expected = pipe(
        first["prompt"], height=32, width=32, num_frames=5, num_inference_steps=2,
        max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]  # fmt: skip
    strip = np.asarray(Image.open(output / first["file"])).astype(np.int16)
    assert strip.shape == (32, 5 * 32, 3)
    assert np.abs(strip - (filmstrip(expected) * 255).round()).max() <= 1
    with av.open(str(output / first["video"])) as container:
        assert len(list(container.decode(video=0))) == 5


class TinyFeatures(torch.nn.Module):
    """A small real feature extractor (seeded conv net): uint8 (N, 3, H, W) -> (N, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=5, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv(images.float() / 255.0)
        return torch.tanh(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def feature_extractor(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fid") / "features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    return str(path)


def _renderings(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    captions = (list(HELD_OUT) * count)[:count]
    return np.stack([np.asarray(shape_image(c, 32, rng)) for c in captions])  # (N, H, W, 3)


def test_fid_is_torchmetrics_fid_and_zero_for_a_set_against_itself(feature_extractor):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from actors.evaluation import fid_skip_reason, frechet_distance
    from schemas.config import FidConfig

    config = FidConfig(reference="unused", feature_extractor=feature_extractor)
    assert fid_skip_reason(config) is None
    a, b = _renderings(0, 40), _renderings(1, 40)
    noise = np.random.default_rng(2).integers(0, 256, size=a.shape, dtype=np.uint8)
    assert abs(frechet_distance(a, a, config, None)) < 1e-3
    direct = FrechetInceptionDistance(feature=torch.jit.load(feature_extractor))
    direct.update(torch.tensor(a).permute(0, 3, 1, 2), real=True)
    direct.update(torch.tensor(b).permute(0, 3, 1, 2), real=False)
    same_domain = frechet_distance(b, a, config, None)
    assert same_domain == pytest.approx(float(direct.compute()), rel=1e-5)
    assert frechet_distance(noise, a, config, None) > 10 * same_domain
    # Without a reference or local weights: skipped, with the reason.
    assert "no fid.reference" in fid_skip_reason(FidConfig(feature_extractor=feature_extractor))
    assert "never downloaded" in fid_skip_reason(FidConfig(reference="x"))


@pytest.mark.slow
def test_raygen_sample_writes_a_corpus_prep_reads(ray_local, tiny_bundles, tmp_path):
    """Class images (DreamBooth's prior preservation): the pipeline's own images for the
    prompt and seeds from first_seed, each beside its caption, listed as prep lists input."""
    output = tmp_path / "class-images"
    config = load_config(
        SampleConfig,
        values={
            "bundle.uri": str(tiny_bundles["t2i"]), "prompt": "a photo of a dog", "seeds": 3,
            "height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16,
            "output": str(output),
        },
    )  # fmt: skip
    result = run_sample(config)
    assert [item["seed"] for item in result["files"]] == [1000, 1001, 1002]
    items = list_inputs(PrepConfig(input=str(output / "train")), Storage())
    assert [Path(item["item_uri"]).name for item in items] == [
        "000000.png", "000001.png", "000002.png"
    ]  # fmt: skip
    assert all(Path(item["caption_uri"]).read_text() == "a photo of a dog\n" for item in items)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_bundles["t2i"])
    expected = pipe(
        "a photo of a dog", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
        generator=torch.Generator().manual_seed(1001), output_type="np",
    ).images[0]  # fmt: skip
    got = np.asarray(Image.open(output / "train" / "000001.png")).astype(np.int16)
    assert np.abs(got - (expected * 255).round()).max() <= 1

    with pytest.raises(ConfigError, match="^prompt: give a prompt"):
        run_sample(config.model_copy(update={"prompts": str(tmp_path / "p.txt")}))
