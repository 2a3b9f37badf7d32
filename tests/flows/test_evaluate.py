"""`raygen evaluate`: images from a bundle on Ray Data, equal to the pipeline's own for the
same seeds; prompt following read from pixels; CLIP score equal to torchmetrics' own over the
same images; a report; and clear errors for prompts and metrics."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from torchmetrics.multimodal.clip_score import CLIPScore

from actors.evaluation import ImageScores, clip_model_and_processor, png
from cluster.storage import Storage
from flows.evaluate import read_prompts, run_evaluate, summarize
from flows.models import build_tiny_bundles
from flows.shapes import shape_image
from schemas.config import ConfigError, EvaluateConfig, ModelRef, load_config
from schemas.shapes import HELD_OUT

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
    }
    scores = ImageScores(scorer, None)(batch)
    for category in ("color", "shape", "place"):
        assert list(scores[category]) == [True] * len(prompts)
    assert list(scores["direction"]) == [None] * len(prompts)  # no image prompt names one
    # The mean of the per-image scores is CLIPScore over the whole set.
    direct = CLIPScore(model_name_or_path=lambda: clip_model_and_processor(scorer))
    direct.update(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), prompts)
    assert np.mean(scores["clip_score"]) == pytest.approx(float(direct.compute()), rel=1e-5)


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
    with pytest.raises(ConfigError, match="unknown metric 'fid2'; known: prompt_following"):
        load_config(EvaluateConfig, values={"metrics": ["prompt_following", "fid2"]})


@pytest.mark.slow
def test_evaluate_a_bundle_on_ray_data(ray_local, tiny_bundles, tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
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
        },
    )
    result = run_evaluate(config.model_copy(update={"output": str(output)}))
    saved = json.loads((output / "eval.json").read_text())
    assert saved["metrics"] == result["metrics"]
    assert saved["metrics"]["prompt_following"]["images"] == 4  # two shapes prompts x 2 seeds
    assert saved["metrics"]["clip_score"]["images"] == 6
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
