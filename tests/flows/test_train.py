"""`raygen train` on a real local Ray with 2 workers, on shards `raygen prep` made: config
mistakes caught before workers start, image and video training, resume (on another number
of workers too, from sharded checkpoints on s3://), a non-finite loss, and an exported
bundle that plain diffusers loads and samples. A worker lost mid-run: tests/chaos."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusion3Pipeline, WanImageToVideoPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from actors.families import family_of
from cluster.storage import Storage
from flows.evaluate import run_evaluate
from flows.models import build_tiny_bundles
from flows.objectives import RectifiedFlow, add_lora, export_lora
from flows.shard_reader import embeddings_and_latents
from flows.train import (
    TrainingError,
    held_out_images,
    plan_run,
    run_train,
    sample_grid,
    warmup_cosine,
)
from schemas.config import AdapterConfig, ConfigError, EvaluateConfig, TrainConfig, load_config
from schemas.shapes import HELD_OUT
from schemas.shards import IMAGE_CONDITION, IMAGE_EMBEDS, BucketKey

pytestmark = pytest.mark.slow


def _config(bundles, shards, output, **values) -> TrainConfig:
    defaults = {
        "data": str(shards),
        "output": str(output),
        "bundle.uri": str(bundles["t2i"]),
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "batch_size": 4,
        "max_steps": 4,
        "checkpoint_every": 2,
    }
    return load_config(TrainConfig, values={**defaults, **values})


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _read_checkpoint(folder: Path) -> dict:
    """A checkpoint's state as one process reads it back whole (every rank's shards joined),
    with torch.distributed.checkpoint's own reader and no process group."""
    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(folder, Path(scratch) / "state.pt")
        return torch.load(Path(scratch) / "state.pt", weights_only=False)


def _tensorboard(output: Path) -> dict[str, dict[int, float]]:
    """What TensorBoard shows of a run: scalars by tag and step, images as tag -> steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(output / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    shown = {
        tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
    }
    return shown | {
        tag: {e.step: 0.0 for e in events.Images(tag)} for tag in events.Tags()["images"]
    }


def _wandb_history(folder: Path) -> list[dict]:
    """The history rows of W&B's offline run files (``run-<id>.wandb``): W&B's record log
    (32 KiB blocks of chunks with a 7-byte header) of its protobuf records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        raw, position, pending = path.read_bytes(), 7, b""  # a 7-byte file header first
        while position + 7 <= len(raw):
            if 32768 - position % 32768 < 7:  # a block's tail too short for a header
                position += 32768 - position % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
            pending += raw[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or a record's last chunk
                record = wandb_internal_pb2.Record.FromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                    )
    return rows


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine(step, warmup=2, total=10, floor=0.1) for step in range(12)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0  # warmup, then the peak
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # cosine decays
    assert lrs[10] == pytest.approx(0.1) and lrs[11] == pytest.approx(0.1)  # floor


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"data": "/nonexistent/shards"}, "data", "run `raygen prep`"),
        ({"batch_size": 3}, "batch_size", "multiple of num_workers"),
        ({"batch_size": 64}, "batch_size", "needs 64 rows in a bucket"),
        (
            {"init": "scratch", "transformer_config": {"in_channels": 4, "out_channels": 4}},
            "bundle",
            "takes 4 latent channels",
        ),
        ({"init": "scratch", "transformer_config": {"patch_size": 3}}, "data", "patch 3x3"),
        ({"transformer_config": {"num_layers": 1}}, "transformer_config", "init: scratch"),
        (
            {"init": "scratch", "transformer_config": {"joint_attention_dim": 64}},
            "bundle",
            "width 64",
        ),
    ],
)
def test_config_mistakes_fail_before_any_worker_starts(
    tiny_bundles, prep_shards, tmp_path, values, field, message
):
    config = _config(tiny_bundles, prep_shards, tmp_path / "run", **values)
    with pytest.raises(ConfigError) as err:
        plan_run(config, config.bundle.uri, Storage())
    assert str(err.value).startswith(f"{field}:") and message in str(err.value)


def test_video_bundle_on_image_only_shards_names_the_data(tiny_bundles, prep_shards, tmp_path):
    shards = tmp_path / "image-only"
    manifest = json.loads((prep_shards / "manifest.json").read_text())
    manifest["buckets"] = {
        k: v for k, v in manifest["buckets"].items() if BucketKey.parse(k).media_kind == "image"
    }
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps(manifest))
    config = _config(
        tiny_bundles, shards, tmp_path / "run", **{"bundle.uri": str(tiny_bundles["t2v"])}
    )
    with pytest.raises(ConfigError, match="^data: .* has no video shards"):
        plan_run(config, config.bundle.uri, Storage())


def test_image_to_video_needs_shards_with_first_frames(tiny_bundles, prep_shards, tmp_path):
    # The sample shards without their first-frame columns: what a text-to-video prep writes.
    shards = tmp_path / "text-to-video"
    shutil.copytree(prep_shards, shards)
    for path in (shards / "shards").glob("*x*x*/*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([IMAGE_EMBEDS, IMAGE_CONDITION]), path)
    config = _config(
        tiny_bundles, shards, tmp_path / "run", **{"bundle.uri": str(tiny_bundles["i2v"])}
    )
    with pytest.raises(ConfigError, match="^data: .* no first-frame conditioning"):
        plan_run(config, config.bundle.uri, Storage())


def test_a_sample_grid_of_a_non_square_bucket_is_as_wide_as_its_bucket(
    tiny_bundles, prep_shards, tmp_path
):
    """Prep names buckets height x width and training reads them so: a wide bucket's latents
    and sample images are wide (they came out transposed when the two disagreed)."""
    config = _config(
        tiny_bundles, prep_shards, tmp_path / "run", batch_size=2, num_samples=1, sample_steps=1
    )
    plan = plan_run(config, config.bundle.uri, Storage())
    keys = {name: BucketKey.parse(name) for name in plan.buckets}
    wide = next(plan.buckets[name] for name, key in keys.items() if key.width > key.height)
    key = keys[wide.name]
    assert wide.latent_shape[1:] == (key.height // 8, key.width // 8)  # (C, h, w)
    samples = embeddings_and_latents(pq.read_table(wide.files[0]).slice(0, 1))
    samples.pop("latents")
    plan = dataclasses.replace(plan, sample_bucket=wide.name, samples=samples)
    objective = RectifiedFlow(config, plan, torch.device("cpu"))
    weights = objective.model.state_dict()
    png = sample_grid(objective, plan, weights, config, torch.device("cpu"))
    grid = Image.open(io.BytesIO(png))
    assert grid.size == (key.width, key.height)  # PIL: (width, height)


def test_image_to_video_training_with_fsdp_exports_a_wan_i2v_bundle(
    ray_local, tiny_bundles, prep_shards, tmp_path
):
    """Wan image-to-video on the sample clips (prep stored each one's first-frame
    conditioning), FSDP with gradient checkpointing: its sample grid animates the clips' first
    frames, and the export samples in WanImageToVideoPipeline. Text-to-video trains through
    the same loop without the image (its LoRA test below; its prep is the same shards')."""
    output = tmp_path / "video"
    config = _config(
        tiny_bundles, prep_shards, output, batch_size=2, max_steps=2, parallelism="fsdp",
        gradient_checkpointing=True, sample_every=2, num_samples=2, sample_steps=1,
        **{"bundle.uri": str(tiny_bundles["i2v"])},
    )  # fmt: skip
    assert run_train(config).steps == 2
    grid = Image.open(output / "samples" / "step-0000002.png")
    assert grid.size[0] >= 2 * 48  # two samples of the 9x48x80 clips, side by side or stacked
    pipe = WanImageToVideoPipeline.from_pretrained(output / "bundle")
    frames = pipe(
        image=Image.new("RGB", (32, 32), (200, 40, 40)), prompt="a coloured square",
        num_frames=5, height=32, width=32, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames[0]  # fmt: skip
    assert frames.shape == (5, 32, 32, 3) and np.isfinite(frames).all()


def _six_step_config(bundles, shards, output: Path) -> TrainConfig:
    # Records sent every step (report_every_s 0), each step in metrics.jsonl as it ends.
    return _config(
        bundles, shards, output, max_steps=6, checkpoint_every=2, sample_every=3,
        report_every_s=0,
    )  # fmt: skip


def _tracked(config: TrainConfig, output: Path) -> TrainConfig:
    """The run logged to MLflow (a local mlruns folder) and W&B (offline) as well."""
    tracking = {"mlflow": f"file:{output.parent / 'mlruns'}", "wandb": "raygen-tests"}
    tracking |= {"wandb_mode": "offline", "run_name": "uninterrupted"}
    return config.model_copy(update={"tracking": config.tracking.model_copy(update=tracking)})


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_bundles, prep_shards, tmp_path_factory) -> Path:
    """A 6-step run (logged to MLflow and W&B too), which the resume test continues: its
    output folder. (A worker lost mid-run: tests/chaos, on nodes of their own.)"""
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    config = _tracked(_six_step_config(tiny_bundles, prep_shards, output), output)
    assert run_train(config).steps == 6
    return output


def test_finished_run_resumes_and_exports_a_bundle_diffusers_loads(
    tiny_bundles, prep_shards, uninterrupted
):
    config = _six_step_config(tiny_bundles, prep_shards, uninterrupted)
    losses = {r["step"]: r["loss"] for r in _metrics(uninterrupted)}
    # A second run into the same output is refused unless it resumes.
    with pytest.raises(TrainingError, match="already holds a run"):
        run_train(config.model_copy(update={"max_steps": 7}))
    # Resumed with the held-out prompts scored at its last step (one seed, two steps).
    more = {"max_steps": 7, "resume": True, "eval_every": 7, "eval_seeds": 1, "sample_steps": 2}
    resumed = run_train(_tracked(config, uninterrupted).model_copy(update=more))
    assert resumed.steps == 7
    records = _metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, 8))
    assert {r["step"]: r["loss"] for r in records[:6]} == losses  # history kept as it was
    assert records[6]["resumed_from_step"] == 6
    scores = {k: v for k, v in records[6].items() if k.startswith("eval_")}
    assert sorted(scores) == ["eval_all", "eval_color", "eval_place", "eval_shape"]
    assert all(0 <= v <= 1 for v in scores.values())
    losses[7] = records[6]["loss"]
    # The curves where teams look: TensorBoard, and the one MLflow run and W&B run the resumed
    # run continued (their ids in tracking.json), every step's loss as in metrics.jsonl.
    assert _tensorboard(uninterrupted)["train/loss"] == pytest.approx(losses, rel=1e-6)
    assert _tensorboard(uninterrupted)["eval/shape"] == {7: pytest.approx(scores["eval_shape"])}
    ids = json.loads((uninterrupted / "tracking.json").read_text())
    from mlflow import MlflowClient

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow = MlflowClient(tracking_uri=f"file:{uninterrupted.parent / 'mlruns'}")
    run = mlflow.get_run(ids["mlflow_run_id"])
    assert run.info.run_name == "uninterrupted" and run.data.params["max_steps"] == "6"
    history = {m.step: m.value for m in mlflow.get_metric_history(run.info.run_id, "train/loss")}
    assert history == pytest.approx(losses, rel=1e-6)
    logged = _wandb_history(uninterrupted)
    assert {row["_step"]: row["train/loss"] for row in logged} == pytest.approx(losses, rel=1e-6)
    assert [row["_step"] for row in logged if "samples/path" in row] == [3, 6]
    assert {p.name.split("-")[-1] for p in (uninterrupted / "wandb").glob("offline-run-*")} == {
        ids["wandb_run_id"]
    }

    # The bundle loads unchanged in diffusers and samples; its transformer is the trained one.
    pipe = StableDiffusion3Pipeline.from_pretrained(uninterrupted / "bundle")
    source = StableDiffusion3Pipeline.from_pretrained(tiny_bundles["t2i"])
    trained = dict(pipe.transformer.named_parameters())
    assert any(
        not torch.equal(trained[name], param)
        for name, param in source.transformer.named_parameters()
    )
    image = pipe(
        "a red square", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def _step_back(after: dict, lr: float, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The trained weights one AdamW step (no weight decay) before the checkpoint ``after``,
    from its own moments: w = w_after + lr * m_hat / (sqrt(v_hat) + eps)."""
    assert config.optimizer.weight_decay == 0
    beta1, beta2 = config.optimizer.betas
    weights = {}
    for name, moments in after["optimizer"]["state"].items():
        t = float(moments["step"])
        m_hat = moments["exp_avg"] / (1 - beta1**t)
        v_hat = moments["exp_avg_sq"] / (1 - beta2**t)
        weights[name] = after["model"][name] + lr * m_hat / (v_hat.sqrt() + 1e-8)
    return weights


# Three short runs, about a minute and a half here: twice the usual limit.
@pytest.mark.timeout(600)
def test_fsdp_checkpoints_are_sharded_and_resume_on_another_number_of_workers(
    ray_local, tiny_bundles, prep_shards, s3_bucket, storage_config, tmp_path
):
    """Checkpoints on s3:// in torch.distributed.checkpoint's format, each rank writing its
    own shards: FSDP on 2 workers for 2 steps, resumed on 1 worker for a step, then on 2
    again. Each resumed step starts from the weights, EMA, optimizer moments and LR schedule
    the other number of workers saved (one AdamW step back from the next checkpoint is the
    previous one); the bundle is exported as before."""
    storage = Storage(storage_config)
    output = f"{s3_bucket}/run"
    config = _config(
        tiny_bundles, prep_shards, output, max_steps=2, parallelism="fsdp",
        checkpoints_to_keep=3, storage=storage_config.model_dump(),
        **{"optimizer.learning_rate": 1e-2},
    )  # fmt: skip
    assert run_train(config).steps == 2
    resumed = {"max_steps": 3, "num_workers": 1, "resume": True}
    assert run_train(config.model_copy(update=resumed)).steps == 3
    resumed = {"max_steps": 4, "num_workers": 2, "resume": True}
    assert run_train(config.model_copy(update=resumed)).steps == 4

    text = storage.read_bytes(f"{output}/metrics.jsonl").decode()
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r.get("resumed_from_step") for r in records] == [None, None, 2, 3]
    # The schedule went on from the checkpoint's step (each run's own max_steps for its end).
    optim = config.optimizer
    for record, max_steps in zip(records, [2, 2, 3, 4], strict=True):
        assert np.isfinite(record["loss"]) and record["grad_norm"] > 0
        scale = warmup_cosine(record["step"], optim.warmup_steps, max_steps, optim.min_lr_ratio)
        assert record["lr"] == pytest.approx(optim.learning_rate * scale)

    storage.download_dir(f"{output}/ray-train", tmp_path / "ray-train")
    checkpoints = {}
    for folder in (p for p in (tmp_path / "ray-train").glob("checkpoint_*") if p.is_dir()):
        state = _read_checkpoint(folder)
        checkpoints[state["loop"]["step"]] = state
        files = sorted(p.name for p in folder.iterdir())
        # A shard per rank that wrote it: 2 workers at steps 2 and 4, 1 worker at step 3.
        ranks = 1 if state["loop"]["step"] == 3 else 2
        assert files == [".metadata", *(f"__{rank}_0.distcp" for rank in range(ranks))]
    assert sorted(checkpoints) == [2, 3, 4]
    decay = EMAModel([torch.zeros(1)], decay=config.ema_decay).get_decay
    for step in (3, 4):  # 2 workers -> 1, then 1 -> 2
        before, after = checkpoints[step - 1], checkpoints[step]
        assert after["loop"]["ema_step"] == step
        assert after["optimizer"]["state"].keys() == after["ema"].keys()  # every trained weight
        assert all(int(m["step"]) == step for m in after["optimizer"]["state"].values())
        lr = before["optimizer"]["param_groups"][0]["lr"]  # what the next step ran with
        for name, weight in _step_back(after, lr, config).items():
            torch.testing.assert_close(weight, before["model"][name], rtol=1e-4, atol=1e-6)
            # ema = d * ema_before + (1 - d) * weights, d by the EMA's own step count
            ema = decay(step) * before["ema"][name] + (1 - decay(step)) * after["model"][name]
            torch.testing.assert_close(after["ema"][name], ema)

    # The bundle as before: the source's files, its transformer the last checkpoint's EMA.
    bundle, source = tmp_path / "bundle", tiny_bundles["t2i"]
    storage.download_dir(f"{output}/bundle", bundle)
    files = {str(p.relative_to(bundle)) for p in bundle.rglob("*")}
    assert files == {str(p.relative_to(source)) for p in source.rglob("*")}
    exported = load_file(bundle / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[name], w) for name, w in checkpoints[4]["ema"].items())


def test_nonfinite_loss_stops_the_run_naming_the_step(
    ray_local, tiny_bundles, prep_shards, tmp_path
):
    output = tmp_path / "nan"
    # One worker: the check runs on every rank alike, and one process starts sooner than two.
    config = _config(
        tiny_bundles, prep_shards, output, max_steps=3, checkpoint_every=1, num_workers=1,
        **{"optimizer.learning_rate": 1e30, "optimizer.max_grad_norm": None,
           "optimizer.warmup_steps": 0},
    )  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"stopped at step \d+: non-finite .*last good checkpoint"
    ):
        run_train(config)
    assert not (output / "bundle").exists()
    assert any(p.name.startswith("checkpoint") for p in (output / "ray-train").iterdir())


def test_workers_that_leave_no_cpu_for_the_reads_are_refused(
    ray_local, tiny_bundles, prep_shards, tmp_path
):
    # Streamed buckets (none held in memory): Ray Data reads them, and needs a CPU for it.
    config = _config(
        tiny_bundles, prep_shards, tmp_path / "run", cpus_per_worker=1, in_memory_bucket_bytes=0
    )
    with pytest.raises(ConfigError, match=r"^cpus_per_worker: 2 workers x 1 CPUs leave 0 "):
        run_train(config)


@pytest.mark.slow
def test_the_loops_held_out_images_are_the_ones_raygen_evaluate_makes(
    ray_local, tiny_bundles, prep_shards, tmp_path
):
    """eval_every scores what `raygen evaluate` would score for the same weights: the same
    prompts, seeds and settings give the same images."""
    config = _config(tiny_bundles, prep_shards, tmp_path / "run", eval_every=1, eval_seeds=2)
    config = config.model_copy(update={"sample_steps": 2})
    plan = plan_run(config, config.bundle.uri, Storage())
    assert plan.eval_prompts == [caption.text for caption in HELD_OUT]
    objective = RectifiedFlow(config, plan, torch.device("cpu"))
    weights = objective.model.state_dict()  # the bundle's own transformer
    ours = held_out_images(objective, plan, weights, config, torch.device("cpu"))

    bucket = BucketKey.parse(plan.sample_bucket)
    manifest = json.loads((prep_shards / "manifest.json").read_text())
    output = tmp_path / "eval"
    evaluate = load_config(
        EvaluateConfig,
        values={
            "bundle.uri": str(tiny_bundles["t2i"]), "seeds": 2,
            "height": bucket.height, "width": bucket.width, "num_inference_steps": 2,
            "guidance_scale": config.sample_guidance_scale,
            "max_sequence_length": manifest["config"]["encode"]["max_sequence_length"],
            "metrics": ["prompt_following"], "output": str(output), "generate.num_cpus": 0.5,
        },
    )  # fmt: skip
    theirs = run_evaluate(evaluate)["images"]
    assert [(prompt, seed) for prompt, seed, _ in ours] == [
        (row["prompt"], row["seed"]) for row in theirs
    ]
    for (_, _, image), row in zip(ours, theirs, strict=True):
        saved = np.asarray(Image.open(output / row["file"])).astype(np.int16)
        assert np.abs(image.astype(np.int16) - saved).max() <= 1, row["file"]


@pytest.mark.slow
def test_dreambooth_lora_with_prior_preservation_loads_in_plain_diffusers(
    ray_local, tiny_bundles, prep_shards, uninterrupted, tmp_path
):
    """`adapter: lora` with `prior.data` (DreamBooth-LoRA; the same shards stand in for the
    class images), under FSDP (frozen base and trainable LoRA in the same sharded blocks):
    only the LoRA trains; a class batch trains beside each instance batch, which is drawn as
    without it; checkpoints hold the LoRA, its optimizer and the class position; the output
    is diffusers' LoRA format, which `load_lora_weights` takes unchanged; a resumed run
    continues it."""
    output = tmp_path / "lora"
    config = _config(
        tiny_bundles, prep_shards, output, max_steps=4, sample_every=4, parallelism="fsdp",
        **{"adapter.rank": 4, "optimizer.learning_rate": 1e-2, "prior.data": str(prep_shards)},
    )  # fmt: skip
    missing = config.model_copy(update={"prior": config.prior.model_copy(update={"data": "/no"})})
    with pytest.raises(ConfigError, match="^prior.data: no /no/manifest.json"):
        run_train(missing.model_copy(update={"output": str(tmp_path / "missing")}))

    result = run_train(config)
    adapter = output / "adapter"
    assert result.steps == 4 and result.bundle == str(adapter)
    # The LoRA starts as the identity (lora_B = 0) and the instance batch is the plain run's:
    # the first loss is the uninterrupted full run's first; each step has its class loss.
    records = _metrics(output)
    assert records[0]["loss"] == pytest.approx(_metrics(uninterrupted)[0]["loss"], rel=1e-5)
    assert all(np.isfinite(r["prior_loss"]) and r["prior_loss"] > 0 for r in records)
    assert not (output / "bundle").exists()
    recorded = json.loads((adapter / "raygen_adapter.json").read_text())
    assert recorded["base"] == str(tiny_bundles["t2i"]) and recorded["rank"] == 4
    layers = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert layers and all(".lora_A." in k or ".lora_B." in k for k in layers)
    # The checkpoint is the LoRA and its optimizer: no base weight in it.
    [latest] = sorted(p for p in (output / "ray-train").glob("checkpoint_*") if p.is_dir())[-1:]
    state = _read_checkpoint(latest)
    assert state["model"] and all(".lora_" in key for key in (*state["model"], *state["ema"]))
    assert len(state["optimizer"]["state"]) == len(state["model"])
    assert state["loop"]["prior_epoch"] >= 0 and state["loop"]["prior_position"] >= 0

    # Plain diffusers: the LoRA loads unchanged and changes the picture; the base does not.
    settings = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_bundles["t2i"])
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **settings)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(adapter)
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **settings)
    assert np.abs(after.images - before.images).max() > 1e-3
    pipe.unload_lora_weights()
    assert all(torch.equal(base[k], v) for k, v in pipe.transformer.state_dict().items())

    resumed = run_train(config.model_copy(update={"max_steps": 5, "resume": True}))
    assert resumed.steps == 5 and [r["step"] for r in _metrics(output)] == [1, 2, 3, 4, 5]
    assert load_file(adapter / "pytorch_lora_weights.safetensors").keys() == layers.keys()


@pytest.fixture(scope="module")
def own_bundles(tmp_path_factory) -> dict[str, Path]:
    """Tiny bundles built here (no wait for the session's background runs)."""
    return build_tiny_bundles(tmp_path_factory.mktemp("bundles"), ["t2i", "t2v"])


@pytest.mark.parametrize("kind", ["t2i", "t2v"])
def test_an_exported_lora_in_plain_diffusers_draws_what_the_trained_transformer_draws(
    own_bundles, kind, tmp_path
):
    """The LoRA as the loop holds it (peft on the bundle's transformer, its matrices set)
    and as `load_lora_weights` reads the export: the same picture, SD3 and Wan."""
    family = family_of(str(own_bundles[kind]))
    trained = family.pipeline.from_pretrained(own_bundles[kind])
    add_lora(trained.transformer, AdapterConfig(rank=4))
    generator = torch.Generator().manual_seed(0)
    for param in trained.transformer.parameters():
        if param.requires_grad:  # as if trained: lora_B starts at zero
            param.data = torch.randn(param.shape, generator=generator) * 0.3
    export_lora(
        family, "base-uri", AdapterConfig(rank=4), trained.transformer.state_dict(), tmp_path
    )
    assert json.loads((tmp_path / "raygen_adapter.json").read_text())["base"] == "base-uri"

    plain = family.pipeline.from_pretrained(own_bundles[kind])
    plain.load_lora_weights(tmp_path)
    settings = {"height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    settings |= {"num_frames": 5} if kind == "t2v" else {}
    ours, theirs = (
        pipe("a red circle", generator=torch.Generator().manual_seed(1), **settings)
        for pipe in (trained, plain)
    )
    frames = "frames" if kind == "t2v" else "images"
    assert np.abs(getattr(ours, frames) - getattr(theirs, frames)).max() < 1e-5
