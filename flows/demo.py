"""`raygen demo`: from nothing to a model that follows prompts, on a laptop CPU, in minutes.

On the embedded defaults (local Ray, local storage under one data folder), each step one of
raygen's own jobs: the shapes corpus -> an autoencoder trained on it (`raygen vae`) -> prep
(latents with that VAE, text embeddings) -> an SD3 transformer trained from scratch
(`raygen train`) -> a 4-step student distilled from it (`raygen distill`) -> the teacher
scored from its bundle and the student scored through `raygen serve` (`raygen evaluate`, on
held-out prompts) -> a report folder: the metrics table, both grids, the loss curves.

``--quick`` runs the same chain at smoke sizes (the tests use it). A re-run in the same data
folder reuses the steps that finished (``report/demo.json``) and resumes an unfinished
training step from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from actors.evaluation import sampling_settings
from cluster.ray_runtime import init_ray
from flows.autoencoder import run_autoencoder
from flows.distill import run_distill
from flows.evaluate import run_evaluate
from flows.models import build_short_context_t2i, build_tiny_bundles
from flows.prep import run_prep
from flows.shapes import MEDIA_DIR, build_shapes_corpus
from flows.train import run_train
from schemas.config import (
    AutoencoderConfig,
    C,
    ConfigError,
    DistillConfig,
    EvaluateConfig,
    PrepConfig,
    ServeConfig,
    TrainConfig,
    dump_config,
    load_config,
)

STATE_FILE = "report/demo.json"
# Shapes captions are 6-7 words: 12 text positions per encoder hold them with room, where
# SD3's 77 CLIP positions would triple what every transformer step attends over.
TEXT_POSITIONS = 12
# What the full demo is measured against (issue 11): held-out prompts, teacher at its
# default steps; the student within STUDENT_MARGIN of the teacher in each category.
TARGETS = {"color": 0.95, "place": 0.95, "shape": 0.75}
STUDENT_MARGIN = 0.10


@dataclass(frozen=True)
class DemoSizes:
    """How big each step is. The full demo's sizes fit issue 11's 15 minutes on 2 cores
    (benchmarks/results/demo.json). Smaller, measured: 300 VAE and 600 transformer steps
    (7.4 min) gave a VAE that drew squares with round corners and a teacher shape accuracy
    of 0.65; 800 and 1000 (12 min) gave teacher colors of 1.00 and 0.83 in two runs (runs
    are not bit-reproducible: two workers, Ray Data's shuffle)."""

    images: int  # shapes corpus
    size: int  # px, square
    vae_steps: int
    vae_channels: tuple[int, ...]
    train_steps: int
    train_batch: int
    train_layers: int
    learning_rate: float
    distill_steps: int
    distill_batch: int
    seeds: int  # evaluation images per held-out prompt
    teacher_steps: int | None  # None: the pipeline's default (28)


FULL = DemoSizes(
    images=1200,
    size=32,
    vae_steps=600,
    vae_channels=(32, 64, 64),
    train_steps=1200,
    train_batch=64,
    train_layers=6,
    learning_rate=1e-3,
    distill_steps=150,
    distill_batch=32,
    seeds=4,
    teacher_steps=None,
)
QUICK = DemoSizes(
    images=96,
    size=32,
    vae_steps=3,
    vae_channels=(8, 16, 16),
    train_steps=3,
    train_batch=8,
    train_layers=1,
    learning_rate=1e-3,
    distill_steps=2,
    distill_batch=8,
    seeds=1,
    teacher_steps=4,
)
GUIDANCE = 4.0  # the teacher's CFG, in evaluation and folded into the student


@dataclass(frozen=True)
class DemoPaths:
    data: Path

    @property
    def bundles(self) -> Path:
        return self.data / "bundles"

    @property
    def base(self) -> Path:
        return self.data / "bundles" / "t2i-short"

    @property
    def shapes(self) -> Path:
        return self.data / "shapes"

    @property
    def shards(self) -> Path:
        return self.data / "shapes-shards"

    def run(self, name: str) -> Path:
        return self.data / "runs" / name

    def bundle(self, run: str) -> Path:
        return self.run(run) / "bundle"

    def eval(self, name: str) -> Path:
        return self.data / "eval" / name

    @property
    def report(self) -> Path:
        return self.data / "report"


class DemoState:
    """Which steps finished, and in how long: ``report/demo.json``, rewritten after each."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        data = path.parents[1]
        if not path.exists() and (data / "runs").exists():
            # An earlier raygen's demo, or runs of the user's own: resuming them as this
            # demo's steps would mix models.
            raise ConfigError(
                f"--data-dir {data} holds runs/ but no {STATE_FILE}: not this demo's; choose "
                "another data folder, or remove that one"
            )
        state = json.loads(path.read_text()) if path.exists() else {"mode": mode, "steps": {}}
        if state["mode"] != mode:
            raise ConfigError(
                f"--data-dir {data} holds a {state['mode']} demo; this is a {mode} "
                "one: choose another data folder, or remove that one"
            )
        self.state = state

    def done(self, step: str) -> bool:
        return step in self.state["steps"]

    def finish(self, step: str, seconds: float, **facts: Any) -> None:
        self.state["steps"][step] = {"seconds": round(seconds, 1), **facts}
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.state, indent=1) + "\n")


def step_config(paths: DemoPaths, name: str, cls: type[C], **kwargs: Any) -> C:
    """The step's config, also written to ``configs/<name>.yaml``: `raygen <flow> --config`
    runs that step again on its own (another output, other settings)."""
    config = load_config(cls, **kwargs)
    (paths.data / "configs").mkdir(parents=True, exist_ok=True)
    (paths.data / "configs" / f"{name}.yaml").write_text(dump_config(config))
    return config


def _loop_values(steps: int, output: Path) -> dict[str, Any]:
    """What the three Ray Train runs share: checkpoints and progress lines spaced by the run's
    length, buckets held in memory, and resume when a crashed demo left checkpoints."""
    return {
        "output": str(output),
        "max_steps": steps,
        "checkpoint_every": max(1, steps // 3),
        "log_every": max(1, steps // 50),
        "report_every_s": 20.0,
        "in_memory_bucket_bytes": 2**30,
        "resume": (output / "ray-train").exists(),
    }


def train_vae(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    config = step_config(
        paths,
        "vae",
        AutoencoderConfig,
        values={
            **_loop_values(sizes.vae_steps, paths.run("vae")),
            "data": str(paths.shapes / MEDIA_DIR),
            "bundle.uri": str(paths.base),
            "init": "scratch",
            # 4x down (three levels), 4 latent channels: a 32 px image is an 8x8x4 latent.
            "vae_config": {
                "block_out_channels": list(sizes.vae_channels),
                "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3,
                "latent_channels": 4,
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "sample_size": sizes.size,
            },
            "resolution": sizes.size,
            "cpus_per_worker": 0.5,
            "batch_size": 32,
            "optimizer.learning_rate": 1e-3,
            "optimizer.warmup_steps": min(20, sizes.vae_steps),
            "ema_decay": 0.99,
        },
    )
    result = run_autoencoder(config)
    return {
        "steps": result.steps,
        "loss": result.metrics.get("loss"),
        "parameters": _parameters(paths.bundle("vae") / "vae"),
    }


def _parameters(component: Path) -> int:
    """Parameters in a component folder's safetensors files (read from their headers)."""
    count = 0
    for file in component.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            for name in weights.keys():  # safe_open has no __iter__
                count += math.prod(weights.get_slice(name).get_shape())
    return count


def prep_shapes(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    config = step_config(
        paths,
        "prep",
        PrepConfig,
        values={
            "input": str(paths.shapes / MEDIA_DIR),
            "output": str(paths.shards),
            "bundle.uri": str(paths.bundle("vae")),
            "buckets.resolution": sizes.size,
            "encode.max_sequence_length": TEXT_POSITIONS,
        },
        # Images only; the corpus's captions are the truth: no captioner, no CLIP filter.
        overrides=["video_bundle=null", "caption.model=null", "filters.scorer=null"],
    )
    manifest = run_prep(config)
    return {"rows": manifest.num_written, "quarantined": len(manifest.quarantined)}


def train_transformer(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    config = step_config(
        paths,
        "train",
        TrainConfig,
        values={
            **_loop_values(sizes.train_steps, paths.run("train")),
            "data": str(paths.shards),
            "bundle.uri": str(paths.bundle("vae")),
            "init": "scratch",
            # An MMDiT over the 8x8x4 latents, one token per latent pixel (patch 1).
            "transformer_config": {
                "sample_size": sizes.size // 4,
                "patch_size": 1,
                "in_channels": 4,
                "out_channels": 4,
                "num_layers": sizes.train_layers,
                "attention_head_dim": 32,
                "num_attention_heads": 4,
                "caption_projection_dim": 128,
                "pos_embed_max_size": 16,
            },
            "caption": "original",
            # The held-out prompts scored five times along the way (8 steps, CFG 4).
            "eval_every": max(1, sizes.train_steps // 5),
            "eval_seeds": 2,
            "sample_guidance_scale": GUIDANCE,
            "cpus_per_worker": 1,
            "batch_size": sizes.train_batch,
            "optimizer.learning_rate": sizes.learning_rate,
            "optimizer.warmup_steps": min(50, sizes.train_steps),
            "ema_decay": 0.99,
        },
    )
    result = run_train(config)
    history = [json.loads(line) for line in (paths.run("train") / "metrics.jsonl").open()]
    return {
        "steps": result.steps,
        "loss": result.metrics.get("loss"),
        # Prompt following of the EMA weights along the way (8 steps, 2 seeds).
        "eval": {
            r["step"]: {c: r[f"eval_{c}"] for c in ("color", "shape", "place", "all")}
            for r in history
            if "eval_all" in r
        },
        "parameters": _parameters(paths.bundle("train") / "transformer"),
    }


def distill_student(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    config = step_config(
        paths,
        "distill",
        DistillConfig,
        values={
            **_loop_values(sizes.distill_steps, paths.run("distill")),
            "data": str(paths.shards),
            "teacher.uri": str(paths.bundle("train")),
            "student_steps": 4,
            "guidance_scale": GUIDANCE,
            # A finer teacher ODE grid than the default 16: from one teacher, two students at
            # 32 followed color 0.94 and 0.94 where two at 16 followed 0.90 and 0.90.
            "num_teacher_steps": 32,
            "caption": "original",
            "cpus_per_worker": 1,
            "batch_size": sizes.distill_batch,
            "optimizer.learning_rate": 1e-4,
            "optimizer.warmup_steps": min(10, sizes.distill_steps),
            "ema_decay": 0.9,
        },
    )
    result = run_distill(config)
    return {"steps": result.steps, "loss": result.metrics.get("loss")}


def _evaluate(paths: DemoPaths, sizes: DemoSizes, name: str, **values: Any) -> dict[str, Any]:
    config = step_config(
        paths,
        f"evaluate-{name}",
        EvaluateConfig,
        values={
            "seeds": sizes.seeds,
            "height": sizes.size,
            "width": sizes.size,
            "max_sequence_length": TEXT_POSITIONS,
            # The detector's verdicts only: CLIP score and FID need real weights (a CLIP folder,
            # Inception weights), which the tiny bundles are not.
            "metrics": ["prompt_following"],
            "output": str(paths.eval(name)),
            "generate.concurrency": 2,
            "generate.batch_size": 8,
            **values,
        },
    )
    return run_evaluate(config)["metrics"]


def evaluate_teacher(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    return _evaluate(
        paths,
        sizes,
        "teacher",
        **{
            "bundle.uri": str(paths.bundle("train")),
            "num_inference_steps": sizes.teacher_steps,
            "guidance_scale": GUIDANCE,
        },
    )


def serve_and_evaluate_student(paths: DemoPaths, sizes: DemoSizes) -> dict[str, Any]:
    """The student on Ray Serve (the whole graph: text encoders, base, VAE decode, safety
    and watermark), evaluated through its HTTP API with the same seeds."""
    from ray import serve

    from flows.serve.app import APP_NAME, build_app

    student = paths.bundle("distill")
    sampling = sampling_settings(student, None, None)  # 4 steps, guidance folded in
    config = step_config(
        paths,
        "serve",
        ServeConfig,
        values={
            "bundle.uri": str(student),
            "port": _free_port(),
            "max_sequence_length": TEXT_POSITIONS,
            "output": str(paths.data / "outputs"),
        },
    )
    init_ray(config.ray)
    # Serve's start-up lines stay in Ray's logs, as the other steps' do; the demo says where.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        url = f"http://{config.host}:{config.port}"
        print(f"      serving the student at {url}", flush=True)
        return _evaluate(paths, sizes, "student", url=url, **sampling)
    finally:
        # The app's replicas stop here; Serve itself ends with the demo's Ray.
        serve.delete(APP_NAME)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_report(paths: DemoPaths, sizes: DemoSizes, state: DemoState) -> Path:
    """report.md (metrics table, grids, loss curves, step times) beside demo.json."""
    report = paths.report
    report.mkdir(parents=True, exist_ok=True)
    for run in ("vae", "train", "distill"):
        if (paths.run(run) / "loss.png").exists():
            shutil.copyfile(paths.run(run) / "loss.png", report / f"loss-{run}.png")
    for name in ("teacher", "student"):
        shutil.copyfile(paths.eval(name) / "grid.png", report / f"grid-{name}.png")
    steps = state.state["steps"]
    metrics = {name: steps[f"evaluate {name}"]["metrics"] for name in ("teacher", "student")}
    following = {name: m["prompt_following"] for name, m in metrics.items()}
    checks = {f"teacher {c} >= {t}": following["teacher"][c] >= t for c, t in TARGETS.items()} | {
        f"student {c} within {STUDENT_MARGIN:.2f}": following["student"][c]
        >= following["teacher"][c] - STUDENT_MARGIN
        for c in TARGETS
    }
    seconds = sum(step["seconds"] for step in steps.values())
    state.state.update(
        sizes=asdict(sizes), targets=checks, seconds=round(seconds, 1), report=str(report)
    )
    state.save()

    lines = [
        "# raygen demo",
        "",
        f"{len(steps)} steps in {seconds / 60:.1f} min, from nothing: the shapes corpus "
        f"({sizes.images} images at {sizes.size} px) -> VAE -> prep -> SD3 transformer from "
        "scratch -> 4-step student -> evaluated on the held-out prompts, the student "
        "through `raygen serve`.",
        "",
        f"The transformer has {steps['train']['parameters'] / 1e6:.2f} M parameters, the VAE "
        f"{steps['vae']['parameters'] / 1e6:.2f} M; the text encoders are the tiny bundle's, "
        f"frozen, {TEXT_POSITIONS} positions each. Prompt following is read from the pixels by "
        "the shapes detector, on the 12 (color, shape, place) triples held out of training.",
        "",
        "| model | steps | color | shape | place | all | images |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    sampled = {
        "teacher": sizes.teacher_steps or 28,
        "student": sampling_settings(paths.bundle("distill"), None, None)["num_inference_steps"],
    }
    for name in ("teacher", "student"):
        f = following[name]
        lines.append(
            f"| {name} | {sampled[name]} | {f['color']:.2f} | {f['shape']:.2f} | "
            f"{f['place']:.2f} | {f['all']:.2f} | {f['images']} |"
        )
    lines += [
        "",
        "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items()),
    ]
    lines += [
        "",
        "## Along the way",
        "",
        "The transformer's EMA weights on the held-out prompts during training (the loop's "
        "`eval_every`: 8 steps, 2 seeds, CFG 4):",
        "",
        "| step | color | shape | place | all |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {step} | {e['color']:.2f} | {e['shape']:.2f} | {e['place']:.2f} | {e['all']:.2f} |"
        for step, e in steps["train"].get("eval", {}).items()
    ]
    lines += ["", "## Held-out prompts (a row per prompt, a column per seed)", ""]
    lines += ["Teacher:", "", "![teacher](grid-teacher.png)", "", "Student, served:", ""]
    lines += ["![student](grid-student.png)", "", "## Loss", ""]
    lines += [f"![{run}](loss-{run}.png)" for run in ("vae", "train", "distill")]
    lines += [
        "",
        f"The curves and held-out scores in TensorBoard: `tensorboard --logdir {paths.data / 'runs'}`",
    ]
    lines += ["", "## Steps", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {step['seconds']} |" for name, step in steps.items()]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    return report / "report.md"


def run_demo(data_dir: str | Path, quick: bool = False) -> None:
    paths = DemoPaths(Path(data_dir).resolve())
    sizes = QUICK if quick else FULL
    state = DemoState(paths.data / STATE_FILE, "quick" if quick else "full")
    started = time.perf_counter()

    def bundles() -> dict[str, Any]:
        built = build_tiny_bundles(paths.bundles)
        build_short_context_t2i(paths.base, TEXT_POSITIONS)
        return {"bundles": sorted(built)}

    def shapes() -> dict[str, Any]:
        corpus = build_shapes_corpus(paths.shapes, count=sizes.images, size=sizes.size)
        return {"images": len(corpus.images), "held_out": len(corpus.held_out)}

    steps: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("bundles", f"tiny model bundles -> {paths.bundles}", bundles),
        ("shapes", f"shapes corpus ({sizes.images} images) -> {paths.shapes}", shapes),
        ("vae", f"train the VAE with Ray Train -> {paths.run('vae')}",
         lambda: train_vae(paths, sizes)),
        ("prep", f"prep with the new VAE on Ray Data -> {paths.shards}",
         lambda: prep_shapes(paths, sizes)),
        ("train", f"train an SD3 transformer from scratch -> {paths.run('train')}",
         lambda: train_transformer(paths, sizes)),
        ("distill", f"distill a 4-step student -> {paths.run('distill')}",
         lambda: distill_student(paths, sizes)),
        ("evaluate teacher", f"evaluate the teacher on held-out prompts -> {paths.eval('teacher')}",
         lambda: {"metrics": evaluate_teacher(paths, sizes)}),
        ("evaluate student", f"serve the student, evaluate it through the server -> "
         f"{paths.eval('student')}", lambda: {"metrics": serve_and_evaluate_student(paths, sizes)}),
    ]  # fmt: skip
    total = len(steps) + 1
    for index, (name, title, step) in enumerate(steps, start=1):
        if state.done(name):
            print(f"[{index}/{total}] {title}: done before, reused", flush=True)
            continue
        print(f"[{index}/{total}] {title}", flush=True)
        began = time.perf_counter()
        facts = step()
        state.finish(name, time.perf_counter() - began, **facts)

    print(f"[{total}/{total}] report -> {paths.report}", flush=True)
    report = write_report(paths, sizes, state)
    for line in _summary(state):
        print(f"      {line}")
    print(f"done in {time.perf_counter() - started:.1f}s; everything is under {paths.data}")
    print(f"curves: tensorboard --logdir {paths.data / 'runs'}")
    print(f"report: {report}")


def _summary(state: DemoState) -> list[str]:
    lines = []
    for name in ("teacher", "student"):
        f = state.state["steps"][f"evaluate {name}"]["metrics"]["prompt_following"]
        lines.append(
            f"{name}: color {f['color']:.2f}, shape {f['shape']:.2f}, place {f['place']:.2f} "
            f"on {f['images']} held-out images"
        )
    missed = [check for check, met in state.state["targets"].items() if not met]
    lines.append("targets: all met" if not missed else f"targets not met: {'; '.join(missed)}")
    return lines
