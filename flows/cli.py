"""The `raygen` command line: one subcommand per flow, one config contract for all of them.

Every flow takes `--config FILE` (YAML of its config model), repeatable `--set key.path=value`
overrides, and flags for the fields everyone sets. Precedence: defaults < file < flags < --set.

The console shows raygen's own lines; `raygen -v COMMAND` shows Ray's and the libraries' output
as well (see cluster/ray_runtime.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from schemas.config import (
    AutoencoderConfig,
    Config,
    DistillConfig,
    EvaluateConfig,
    PrepConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    load_config,
)
from schemas.errors import RaygenError

PROG = "raygen"

EPILOG = """\
examples:
  raygen demo                                  train, distill, serve and score a model from nothing
  raygen models tiny --out ./raygen-data/bundles
  raygen data shapes --out ./shapes --count 2000
  raygen prep --input s3://corpus/raw --output s3://corpus/shards --bundle s3://models/sd3
  raygen prep --config configs/prep.yaml --set caption.resources.concurrency=2
  raygen submit --address http://head:8265 -- prep --config configs/prep.yaml

Commands run on a local Ray started in-process unless --address or $RAY_ADDRESS names a cluster.
Ray's own output goes to its log files (/tmp/ray/session_latest/logs); -v shows it here too.
"""

VERBOSE_HELP = (
    "also show Ray's and the model libraries' output (worker logs, progress bars, warnings); "
    "by default they go to Ray's log files and the console shows raygen's own lines"
)

# Flows that later issues build. Their subcommands already parse and validate a config so
# that scripts and manifests can be written against the final interface today.
PENDING_FLOWS: dict[str, str] = {}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of this command's config")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config field, e.g. --set storage.endpoint_url=http://minio:9000 "
        "(repeatable; values are YAML scalars)",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster to run on (sets ray.address); default: $RAY_ADDRESS, else local Ray",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ray-native data prep, training, distillation and serving for "
        "text-to-image and text-to-video diffusion models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    models = commands.add_parser("models", help="build or inspect model bundles")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    tiny = models_commands.add_parser(
        "tiny",
        help="write tiny seeded bundles of the real model classes (for tests and the demo)",
        description="Write tiny, seeded, deterministic bundles of the real diffusers and "
        "transformers classes in diffusers' folder format (safetensors). No download.",
    )
    tiny.add_argument("--out", required=True, metavar="DIR", help="folder to write bundles into")
    tiny.add_argument(
        "--only", metavar="NAMES", help="comma-separated subset, e.g. t2i,t2v (default: all)"
    )
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")

    data = commands.add_parser("data", help="write built-in corpora")
    data_commands = data.add_subparsers(dest="data_command", metavar="CORPUS", required=True)
    shapes = data_commands.add_parser(
        "shapes",
        help="a synthetic corpus of coloured shapes at places, captioned exactly",
        description="Write images of one coloured shape at one place on a plain background, "
        "each with its exact caption ('a red circle on the left'), and optionally videos of "
        "a moving shape ('a blue square moving up'), plus shapes.json listing the files and "
        "the held-out (color, shape, place) triples no image shows. The media go to "
        "DIR/train, which `raygen prep --input` reads like any corpus.",
    )
    shapes.add_argument("--out", required=True, metavar="DIR", help="folder to write into")
    shapes.add_argument("--count", type=int, default=1000, metavar="N", help="images (%(default)s)")
    shapes.add_argument("--size", type=int, default=64, metavar="PX", help="side (%(default)s)")
    shapes.add_argument("--videos", type=int, default=0, metavar="M", help="videos (%(default)s)")
    shapes.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")

    prep = commands.add_parser(
        "prep",
        help="recaption and encode an image/video corpus into training shards",
        description="Decode, filter, recaption and encode a corpus into parquet shards.",
    )
    _add_config_args(prep)
    prep.add_argument("--input", metavar="URI", help="corpus folder, s3:// prefix or listing")
    prep.add_argument("--output", metavar="URI", help="where shards and the manifest go")
    prep.add_argument("--bundle", metavar="URI", help="model bundle whose VAE/encoders to use")

    train = commands.add_parser(
        "train",
        help="train a diffusion transformer on prep shards with Ray Train",
        description="Train an MMDiT / Wan transformer with rectified flow on prep shards.",
    )
    _add_config_args(train)
    train.add_argument("--data", metavar="URI", help="shards written by `raygen prep`")
    train.add_argument("--output", metavar="URI", help="run folder: checkpoints, metrics, bundle")
    train.add_argument("--bundle", metavar="URI", help="bundle to fine-tune")
    train.add_argument(
        "--resume", action="store_true", default=None, help="continue the latest checkpoint"
    )

    vae = commands.add_parser(
        "vae",
        help="train a bundle's autoencoder (AutoencoderKL) on a corpus with Ray Train",
        description="Train or fine-tune the bundle's VAE on the images of a corpus (read and "
        "decoded as prep does), and write the bundle with it, its scaling_factor and "
        "shift_factor measured on the corpus.",
    )
    _add_config_args(vae)
    vae.add_argument("--data", metavar="URI", help="corpus: folder, s3:// prefix or listing")
    vae.add_argument("--output", metavar="URI", help="run folder: checkpoints, metrics, bundle")
    vae.add_argument("--bundle", metavar="URI", help="bundle whose VAE to train")
    vae.add_argument(
        "--resume", action="store_true", default=None, help="continue the latest checkpoint"
    )

    distill = commands.add_parser(
        "distill",
        help="distill a teacher bundle into a few-step student",
        description="Distill a teacher into a student that samples in 1 to 4 steps.",
    )
    _add_config_args(distill)
    distill.add_argument("--teacher", metavar="URI", help="teacher bundle")
    distill.add_argument("--data", metavar="URI", help="shards written by `raygen prep`")
    distill.add_argument("--output", metavar="URI", help="run folder and student bundle")
    distill.add_argument(
        "--resume", action="store_true", default=None, help="continue the latest checkpoint"
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="score how well a bundle or a server follows prompts (detector, CLIP score): a report",
        description="Generate images for prompts x seeds from a bundle on Ray Data, score "
        "them (prompt following read from pixels for shapes prompts, CLIP score) and write "
        "eval.json, report.md and grid.png.",
    )
    _add_config_args(evaluate)
    evaluate.add_argument("--bundle", metavar="URI", help="bundle to evaluate")
    evaluate.add_argument(
        "--url", metavar="URL", help="a running raygen server to evaluate instead of a bundle"
    )
    evaluate.add_argument(
        "--prompts", metavar="FILE", help="one prompt a line (default: shapes held-out set)"
    )
    evaluate.add_argument("--seeds", type=int, metavar="N", help="images per prompt")
    evaluate.add_argument("--output", metavar="URI", help="where the report goes")

    sample = commands.add_parser(
        "sample",
        help="a bundle's images for prompts x seeds, as a corpus prep reads (class images)",
        description="Generate images (videos for a video bundle) for prompts x seeds from a "
        "bundle on Ray Data and write them with .txt captions (their prompts) under "
        "OUTPUT/train, which `raygen prep --input` reads: DreamBooth's class images for prior "
        "preservation, or synthetic data.",
    )
    _add_config_args(sample)
    sample.add_argument("--bundle", metavar="URI", help="bundle to sample")
    sample.add_argument("--prompt", metavar="TEXT", help='one prompt, e.g. "a photo of a dog"')
    sample.add_argument("--prompts", metavar="FILE", help="or a file of prompts, one a line")
    sample.add_argument("--seeds", type=int, metavar="N", help="images per prompt")
    sample.add_argument("--output", metavar="URI", help="the corpus folder")

    serve = commands.add_parser(
        "serve",
        help="serve the multi-stage generation graph on Ray Serve",
        description="Run the generation graph (encoders, denoiser, refiner, decode, ...).",
    )
    _add_config_args(serve)
    serve.add_argument("--bundle", metavar="URI", help="bundle to serve (for the defaults)")

    generate = commands.add_parser(
        "generate",
        help="generate an image through a running raygen server",
        description="Client for `raygen serve` (POST /v1/generate). Settings left out take "
        "the server's defaults.",
    )
    generate.add_argument("prompt", help="text prompt")
    generate.add_argument(
        "--out", required=True, metavar="FILE", help="output PNG (FILE-<i>.png for several)"
    )
    generate.add_argument(
        "--url", default="http://127.0.0.1:8000", help="server URL (default: %(default)s)"
    )
    generate.add_argument(
        "--api-key",
        default=os.environ.get("RAYGEN_API_KEY"),
        help="bearer API key (default: $RAYGEN_API_KEY)",
    )
    generate.add_argument("--negative-prompt", metavar="TEXT")
    generate.add_argument("--num-inference-steps", "--steps", type=int, metavar="N")
    generate.add_argument("--guidance-scale", type=float, metavar="G")
    generate.add_argument("--height", type=int, metavar="PX")
    generate.add_argument("--width", type=int, metavar="PX")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--num-images", dest="num_images_per_prompt", type=int, metavar="N")
    generate.add_argument(
        "--refiner", action="store_true", default=None, help="hand off to the refiner stage"
    )
    generate.add_argument("--upscale", type=int, metavar="N", help="super-resolution stages")
    generate.add_argument(
        "--model", metavar="NAME", help="one of the server's models (GET /v1/models)"
    )
    generate.add_argument(
        "--lora",
        dest="loras",
        action="append",
        metavar="NAME[:SCALE]",
        help="an adapter from the server's registry (GET /v1/loras), scale 1 unless given; "
        "repeat to combine",
    )

    plan = commands.add_parser(
        "plan",
        help="GPU-hours and cluster shape for prep, train and serve, from measured rates",
        description="Sizes a workload from per-stage rates: benchmarks/gpu.py's JSON (measured "
        "on one GPU) or rates given here; the plan says which each figure rests on.",
    )
    plan.add_argument(
        "--rates",
        default=str(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu.json"),
        metavar="FILE",
        help="benchmarks/gpu.py's JSON (default: the repository's H200 run)",
    )
    plan.add_argument("--prep-images", type=float, metavar="N", help="images to prep")
    plan.add_argument("--train-samples", type=float, metavar="N", help="samples to train on")
    plan.add_argument(
        "--params", type=float, metavar="P", help="the trained model's parameters (default: "
        "the measured model's)",
    )  # fmt: skip
    plan.add_argument(
        "--tokens", type=int, metavar="T", help="tokens per sample (default: the measured)"
    )
    plan.add_argument("--serve-rps", type=float, metavar="R", help="images/s to serve")
    plan.add_argument("--p95-s", type=float, metavar="S", help="p95 latency target of serving")
    plan.add_argument(
        "--days", type=float, default=7.0, help="wall time for prep and train (default: 7)"
    )
    plan.add_argument("--prep-rate", type=float, metavar="IMG_S", help="VAE-encode images/s/GPU")
    plan.add_argument("--train-rate", type=float, metavar="SAMPLES_S", help="samples/s per GPU")
    plan.add_argument(
        "--serve-seconds", type=float, metavar="S", help="seconds per image on one GPU"
    )
    plan.add_argument("--out", metavar="FILE", help="also write the plan as JSON")

    watermark = commands.add_parser(
        "watermark",
        help="check images and videos for raygen's invisible watermark",
        description="Every image and every video frame `raygen serve` returns carries an "
        "invisible watermark.",
    )
    watermark_commands = watermark.add_subparsers(
        dest="watermark_command", metavar="ACTION", required=True
    )
    detect = watermark_commands.add_parser(
        "detect",
        help="say whether images and videos carry the watermark (exit 1 if any does not)",
        description="Read the watermark of each image file (PNG or another lossless format) "
        "and of each frame of each .mp4 (raygen's own; a re-encoded video loses it); a video "
        "is watermarked when more than half of its frames are.",
    )
    detect.add_argument("files", nargs="+", metavar="FILE")
    detect.add_argument(
        "--key", default="raygen", help="the server's safety.watermark_key (default: %(default)s)"
    )

    submit = commands.add_parser(
        "submit",
        help="run any raygen command as a Ray Job on a cluster",
        description="Submit `raygen COMMAND ...` as a Ray Job (the repository is the job's "
        "working_dir), stream its logs and exit with its status.",
        epilog="example: raygen submit --address http://127.0.0.1:8265 -- models tiny --out /tmp/b",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    submit.add_argument(
        "--address", help="Ray dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)"
    )
    submit.add_argument(
        "--no-wait", dest="wait", action="store_false", help="print the job id and return"
    )
    submit.add_argument(
        "--pip",
        action="store_true",
        help="install the project's pip requirements in the job's runtime_env "
        "(for clusters whose image lacks them)",
    )
    submit.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND ...")

    demo = commands.add_parser(
        "demo",
        help="run the main job on the embedded defaults (local Ray, local storage, tiny bundles)",
        description="From nothing to a model that follows prompts, under one data folder on a "
        "local Ray: the shapes corpus, a VAE, prep, an SD3 transformer from scratch, a 4-step "
        "student served on Ray Serve, both evaluated on held-out prompts, and a report. A "
        "re-run reuses the steps that finished.",
    )
    demo.add_argument(
        "--data-dir", default="./raygen-data", metavar="DIR", help="default: %(default)s"
    )
    demo.add_argument(
        "--quick", action="store_true", help="the same chain at smoke sizes (a minute or two)"
    )
    # Also after the command (`raygen demo -v`, `./dev demo -v`); SUPPRESS keeps a -v given
    # before it.
    for command in [*commands.choices.values(), tiny, shapes, detect]:
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def _flow_config(cls: type[Config], args: argparse.Namespace, flags: dict[str, Any]) -> Config:
    values = {key: getattr(args, attr) for attr, key in flags.items()}
    values["ray.address"] = args.address
    return load_config(cls, args.config, args.overrides, values)


# Flag attribute -> config key path, per flow.
FLOW_FLAGS: dict[str, tuple[type[Config], dict[str, str]]] = {
    "prep": (PrepConfig, {"input": "input", "output": "output", "bundle": "bundle.uri"}),
    "train": (
        TrainConfig,
        {"data": "data", "output": "output", "bundle": "bundle.uri", "resume": "resume"},
    ),
    "vae": (
        AutoencoderConfig,
        {"data": "data", "output": "output", "bundle": "bundle.uri", "resume": "resume"},
    ),
    "distill": (
        DistillConfig,
        {"teacher": "teacher.uri", "data": "data", "output": "output", "resume": "resume"},
    ),
    "evaluate": (
        EvaluateConfig,
        {
            "bundle": "bundle.uri",
            "url": "url",
            "prompts": "prompts",
            "seeds": "seeds",
            "output": "output",
        },
    ),
    "sample": (
        SampleConfig,
        {
            "bundle": "bundle.uri",
            "prompt": "prompt",
            "prompts": "prompts",
            "seeds": "seeds",
            "output": "output",
        },
    ),
    "serve": (ServeConfig, {"bundle": "bundle.uri"}),
}


def _run_models(args: argparse.Namespace) -> int:
    from flows.models import TINY_BUNDLES, build_tiny_bundles

    names = args.only.split(",") if args.only else TINY_BUNDLES
    written = build_tiny_bundles(args.out, names=names, seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


def _run_data(args: argparse.Namespace) -> int:
    from flows.shapes import MEDIA_DIR, build_shapes_corpus
    from schemas.shapes import CORPUS_FILE

    try:
        corpus = build_shapes_corpus(
            args.out, count=args.count, size=args.size, videos=args.videos, seed=args.seed
        )
    except ValueError as err:
        raise RaygenError(str(err)) from None
    print(
        f"{len(corpus.images)} images and {len(corpus.videos)} videos of {corpus.size}x"
        f"{corpus.size} -> {os.path.join(args.out, MEDIA_DIR)}; {len(corpus.held_out)} "
        f"held-out prompts in {os.path.join(args.out, CORPUS_FILE)}"
    )
    return 0


def _run_prep(config: PrepConfig) -> int:
    from flows.prep import run_prep

    run_prep(config)
    return 0


def _run_train(config: TrainConfig) -> int:
    from flows.train import run_train

    run_train(config)
    return 0


def _run_vae(config: AutoencoderConfig) -> int:
    from flows.autoencoder import run_autoencoder

    run_autoencoder(config)
    return 0


def _run_distill(config: DistillConfig) -> int:
    from flows.distill import run_distill

    run_distill(config)
    return 0


def _run_evaluate(config: EvaluateConfig) -> int:
    from flows.evaluate import run_evaluate

    run_evaluate(config)
    return 0


def _run_serve(config: ServeConfig) -> int:
    from flows.serve import run_serve

    run_serve(config)
    return 0


# `raygen generate` flags that are GenerateRequest fields.
_GENERATE_FIELDS = (
    "model",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "seed",
    "num_images_per_prompt",
    "refiner",
    "upscale",
)


def _lora(text: str) -> dict[str, str]:
    """``NAME`` or ``NAME:SCALE``, as the request's ``loras`` item (the schema checks both)."""
    name, sep, scale = text.rpartition(":")
    return {"name": name, "scale": scale} if sep else {"name": text}


def _run_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flows.client import ServerError, generate_image, write_images
    from schemas.api import GenerateRequest

    fields = {name: getattr(args, name) for name in _GENERATE_FIELDS}
    if args.loras:
        fields["loras"] = [_lora(text) for text in args.loras]
    try:
        request = GenerateRequest(
            prompt=args.prompt,
            **{name: value for name, value in fields.items() if value is not None},
        )
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in err.errors()
        )
        raise RaygenError(f"invalid request: {problems}") from None
    try:
        response = generate_image(args.url, request, api_key=args.api_key)
    except ServerError as err:
        raise RaygenError(str(err)) from None
    for path in write_images(response, args.out):
        print(path)
    timings = ", ".join(
        f"{stage} {seconds:.2f}s" for stage, seconds in response.stage_seconds.items()
    )
    print(f"seed {response.seed}; {timings}")
    return 0


def _run_watermark(args: argparse.Namespace) -> int:
    import av
    import numpy as np
    from PIL import Image

    from actors.watermark import detect_watermark

    all_marked = True
    for path in args.files:
        if path.lower().endswith(".mp4"):
            try:
                with av.open(path) as container:
                    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            except (OSError, av.FFmpegError) as err:
                raise RaygenError(f"{path}: cannot read video: {err}") from None
            if not frames:
                raise RaygenError(f"{path}: the video has no frames")
            readings = [detect_watermark(frame, args.key) for frame in frames]
            num_marked = sum(reading.present for reading in readings)
            present = num_marked * 2 > len(readings)
            fewest = min(reading.matched_bits for reading in readings)
            details = (
                f"{num_marked}/{len(readings)} frames carry it; fewest bits matching in a frame: "
                f"{fewest}/{readings[0].num_bits}"
            )
        else:
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise RaygenError(f"{path}: cannot read image: {err}") from None
            reading = detect_watermark(pixels, args.key)
            present = reading.present
            details = f"{reading.matched_bits}/{reading.num_bits} bits match"
        print(f"{path}: {'watermarked' if present else 'no watermark'} ({details})")
        all_marked &= present
    return 0 if all_marked else 1


def _run_submit(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise RaygenError("name the raygen command to run, e.g. `raygen submit -- prep ...`")
    from cluster.jobs import project_requirements, submit

    pip = project_requirements() if args.pip else None
    return submit(argv, address=args.address, wait=args.wait, pip=pip)


def _run_sample(config: SampleConfig) -> int:
    from flows.sample import run_sample

    run_sample(config)
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from flows.plan import Rate, Workload, measured_rates, plan, summary_lines

    if not Path(args.rates).exists():
        raise RaygenError(f"--rates: no {args.rates}; run `python -m benchmarks.gpu` on a GPU")
    rates = measured_rates(args.rates)
    given = {
        "prep_images_per_s": args.prep_rate,
        "train_samples_per_s": args.train_rate,
        "serve_seconds_per_image": args.serve_seconds,
    }
    rates = replace(rates, **{name: Rate(value, "given") for name, value in given.items() if value})
    work = Workload(
        prep_images=args.prep_images,
        train_samples=args.train_samples,
        train_params=args.params,
        train_tokens=args.tokens,
        serve_images_per_s=args.serve_rps,
        serve_p95_s=args.p95_s,
        days=args.days,
    )
    result = plan(rates, work)
    nothing = "nothing to plan: give --prep-images, --train-samples or --serve-rps"
    print("\n".join(summary_lines(result) or [nothing]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from flows.demo import run_demo

    run_demo(args.data_dir, quick=args.quick)
    return 0


# Flows that take their typed config.
FLOW_HANDLERS: dict[str, Callable[[Any], int]] = {
    "prep": _run_prep,
    "train": _run_train,
    "vae": _run_vae,
    "distill": _run_distill,
    "evaluate": _run_evaluate,
    "sample": _run_sample,
    "serve": _run_serve,
}

HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "models": _run_models,
    "data": _run_data,
    "generate": _run_generate,
    "watermark": _run_watermark,
    "submit": _run_submit,
    "demo": _run_demo,
    "plan": _run_plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cluster.ray_runtime import configure_console

    # Before any flow imports Ray's libraries or the model libraries: they read it on import.
    configure_console(args.verbose)
    try:
        if args.command in FLOW_FLAGS:
            cls, flags = FLOW_FLAGS[args.command]
            config = _flow_config(cls, args, flags)
            if args.command in FLOW_HANDLERS:
                return FLOW_HANDLERS[args.command](config)
        if args.command in PENDING_FLOWS:
            print(
                f"{PROG} {args.command}: {PENDING_FLOWS[args.command]} is not built yet",
                file=sys.stderr,
            )
            return 1
        return HANDLERS[args.command](args)
    except (RaygenError, ConnectionError) as err:
        # User mistakes (bad config, bad bundle, bad storage URI, an address nothing answers
        # at) are one readable message, not a traceback; each names what was wrong and where.
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
