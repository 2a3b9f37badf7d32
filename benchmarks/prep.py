"""Benchmark: `raygen prep` on Ray Data against a plain sequential Python loop.

Both do the same work on the same corpus with the same models, in this one process and run:
fetch, decode + bucket/crop, (model-free) filters, BLIP recaptioning, SD3 text encoding,
AutoencoderKL encoding, parquet writing, and the manifest's empty-prompt embeddings. The loop
calls the very classes the flow maps (``FetchMedia`` ... ``ShardWriter``) on batches in the
driver, with the flow's per-stage batch sizes: "the same work without Ray". It runs torch on
all cores (its default), and once on one thread, to show what intra-op threads give it.

    python -m benchmarks.prep                 # full run, about 9 minutes on 2 cores
    python -m benchmarks.prep --quick         # N=8 and 4N=32, one start-up run: < 3 minutes
    python -m benchmarks.prep --set caption.resources.concurrency=2   # try a flow setting

What it reports (printed, and as JSON at ``--out``):

- start-up: ``raygen prep`` on the sample corpus and tiny bundles (the config the earlier
  demo ran, now ``tests/sample_prep.py``'s), each run on a fresh local Ray: seconds from the start (Ray starting included) to
  the first shard file written, and the CPU seconds the process tree spent until then;
  medians of ``--startup-repeats`` runs, interleaved with the same job forced to one actor
  pool per model stage (``small_corpus_inputs=0``, what a large corpus runs);

- images/s of each and the ratio flow / loop: medians of ``--repeats`` interleaved runs at
  ``--images`` N (the flow with one actor pool per model stage, as a large corpus runs); one run of each at 4N; and the steady state between them (images/s from N
  to 4N), where fixed costs (for the flow: actor start-up, imports, model loads) cancel out;
- the flow's per-stage throughput (the manifest's ``stage_throughput``: rows per second of
  one actor's busy time) next to the loop's per-stage rows per second;
- CPU utilisation during each run: of the whole machine (/proc/stat), and of this process
  tree alone (driver + Ray's processes and workers), so load from other tenants shows;
- peak memory of the process tree, sampled: the sum of RSS (counts pages shared between
  processes, such as torch's libraries, once per process) and the sum of PSS (shared pages
  split between their users); and the flatness check, the flow's peak at 4N over N.

Models are built here from configs with seeded weights (no hub): the tiny t2i bundle with its
VAE swapped for a wider AutoencoderKL, and a BLIP captioner at ViT-B/16's image geometry, so
that model work dominates the per-image cost. Their parameter counts go into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)

from actors.batches import rows_to_batch
from actors.captioner import Captioner
from actors.decode import MediaDecoder
from actors.encoders import LatentEncoder, TextEncoder, empty_prompt_embeddings, vae_factors
from actors.filters import Filters
from actors.sources import FetchMedia, list_inputs
from actors.writer import ShardWriter
from cluster.ray_runtime import init_ray, shutdown_ray
from cluster.storage import Storage
from flows.models import build_tiny_bundles
from flows.prep import preflight, run_prep
from flows.samples import PHOTOS, build_sample_corpus, photos_dir, write_listing
from schemas.config import PrepConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "prep.json"
NUM_CPUS = 2  # the local Ray of the brief; the loop gets all of the machine's cores
SAMPLE_INTERVAL_S = 0.25
# This machine is shared. Between runs this process tree is idle, so a busier machine is
# someone else's work: wait (a while, not forever) for it to calm down before each run, and
# flag runs during which other tenants took more than NOISY_OTHERS of the cores.
QUIET_BUSY, QUIET_WINDOW_S, QUIET_MAX_WAIT_S = 0.15, 2.0, 90.0
NOISY_OTHERS = 0.10
# The memory target: peak at 4N within 20% of the peak at N.
MEMORY_FLAT_LIMIT = 1.2
RATIO_TARGET = 1.6
# Seconds from the start of a small job (Ray starting included) to its first shard file.
STARTUP_TARGET_S = 15.0

# The flow's settings for a 2-core machine: what a user tuning for this box would write.
# - num_cpus: Ray Data streams only while every stage has a live actor, so all pools must fit
#   in the 2 CPUs at once: fetch + decode 2 x 0.2, filters 0.1, caption 0.35, text + latent
#   encoders 4 x 0.2, the writer 0.25 (fixed by the flow) = 1.9. Ray sets OMP_NUM_THREADS=1
#   in an actor with num_cpus < 1 (floor, at least 1), so every model actor runs torch on one
#   thread and the cores are shared by running stages side by side, not by intra-op threads.
# - concurrency: the VAE is ~80% of the per-image CPU work, so the encode stage gets two
#   actors (``encode.resources`` is shared by TextEncoder and LatentEncoder: two of each).
# - batch_size: BLIP's generate amortises its per-token overhead over a batch (8); the VAE
#   encodes faster per image one at a time on CPU (its activations at 256 px, tens of MB per
#   image, stop fitting in cache in a batch: measured 0.84 s/image at batch 1 against 1.08 at
#   batch 8 on one thread), so encode runs at batch 1. The loop uses the same batch sizes.
FLOW_SETTINGS: dict[str, Any] = {
    "decode.resources.concurrency": 1,
    "decode.resources.batch_size": 8,
    "decode.resources.num_cpus": 0.2,
    "filters.resources.concurrency": 1,
    "filters.resources.batch_size": 8,
    "filters.resources.num_cpus": 0.1,
    "caption.resources.concurrency": 1,
    "caption.resources.batch_size": 8,
    "caption.resources.num_cpus": 0.35,
    "encode.resources.concurrency": 2,
    "encode.resources.batch_size": 1,
    "encode.resources.num_cpus": 0.2,
}
# Images the loop's warm-up run processes (not counted).
WARMUP_IMAGES = 8


# ---------------------------------------------------------------------------------------
# Models: the tiny bundles, with a VAE and a captioner big enough to dominate the cost
# ---------------------------------------------------------------------------------------

# AutoencoderKL at SD3's layout (four levels, 8x downscale, 16 latent channels, two resnets
# per level, no quant convs) and half SD3's widths (128, 256, 512, 512).
VAE_CHANNELS = (64, 128, 256, 256)
# BLIP at ViT-B/16's geometry (224 px, 16 px patches: 196 image tokens) but 6 layers of width
# 384 in the vision tower and the text decoder instead of 12 of 768.
BLIP_WIDTH, BLIP_LAYERS, BLIP_IMAGE_SIZE, BLIP_PATCH = 384, 6, 224, 16


def _num_params(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_benchmark_bundles(out_dir: Path, seed: int = 0) -> tuple[dict[str, Path], dict]:
    """The tiny ``t2i`` and ``captioner`` bundles, with the VAE and the BLIP model replaced
    by larger ones of the same classes; returns the folders and the models' sizes."""
    bundles = build_tiny_bundles(out_dir, ["t2i", "captioner"], seed=seed)

    vae_dir = bundles["t2i"] / "vae"
    tiny_vae = AutoencoderKL.load_config(vae_dir)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
            block_out_channels=VAE_CHANNELS,
            layers_per_block=2,
            latent_channels=tiny_vae["latent_channels"],
            norm_num_groups=32,
            sample_size=tiny_vae["sample_size"],
            use_quant_conv=False,
            use_post_quant_conv=False,
            # The bundle's own factors: they are what training reads from the manifest.
            scaling_factor=tiny_vae["scaling_factor"],
            shift_factor=tiny_vae["shift_factor"],
        )
    shutil.rmtree(vae_dir)
    vae.save_pretrained(vae_dir, safe_serialization=True)

    captioner_dir = bundles["captioner"]
    processor = BlipProcessor.from_pretrained(captioner_dir)
    tokenizer = processor.tokenizer
    heads = BLIP_WIDTH // 64
    vision = BlipVisionConfig(
        hidden_size=BLIP_WIDTH,
        intermediate_size=4 * BLIP_WIDTH,
        num_hidden_layers=BLIP_LAYERS,
        num_attention_heads=heads,
        image_size=BLIP_IMAGE_SIZE,
        patch_size=BLIP_PATCH,
    )
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=BLIP_WIDTH,
        encoder_hidden_size=BLIP_WIDTH,
        intermediate_size=4 * BLIP_WIDTH,
        num_hidden_layers=BLIP_LAYERS,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        blip = BlipForConditionalGeneration(
            BlipConfig(
                vision_config=vision.to_dict(),
                text_config=text.to_dict(),
                projection_dim=BLIP_WIDTH,
                image_text_hidden_size=BLIP_WIDTH,
            )
        )
    processor.image_processor.size = {"height": BLIP_IMAGE_SIZE, "width": BLIP_IMAGE_SIZE}
    shutil.rmtree(captioner_dir)
    blip.save_pretrained(captioner_dir, safe_serialization=True)
    processor.save_pretrained(captioner_dir)

    sizes = {
        "vae": {
            "class": "diffusers.AutoencoderKL",
            "block_out_channels": list(VAE_CHANNELS),
            "layers_per_block": 2,
            "latent_channels": tiny_vae["latent_channels"],
            "params": _num_params(vae),
            "encoder_params": _num_params(vae.encoder),
        },
        "captioner": {
            "class": "transformers.BlipForConditionalGeneration",
            "width": BLIP_WIDTH,
            "layers": BLIP_LAYERS,
            "image_size": BLIP_IMAGE_SIZE,
            "patch_size": BLIP_PATCH,
            "params": _num_params(blip),
            "vision_params": _num_params(blip.vision_model),
        },
    }
    return bundles, sizes


def text_encoder_params(bundle: Path) -> int:
    """Parameters of the (tiny) SD3 text encoders the flow loads: CLIP-L, CLIP-G, T5 shapes."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    return sum(
        _num_params(cls.from_pretrained(bundle, subfolder=subfolder))
        for cls, subfolder in (
            (CLIPTextModelWithProjection, "text_encoder"),
            (CLIPTextModelWithProjection, "text_encoder_2"),
            (T5EncoderModel, "text_encoder_3"),
        )
    )


# ---------------------------------------------------------------------------------------
# Corpus: scikit-image photographs (random crops) and drawn images, with caption sidecars
# ---------------------------------------------------------------------------------------

# (width, height) of drawn images: landscape, portrait and square, so several buckets fill.
DRAWN_SIZES = [(384, 256), (256, 384), (320, 320), (512, 256), (256, 512), (448, 336)]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def _photos() -> list[tuple[Image.Image, str]]:
    folder = photos_dir()
    if folder is None:
        raise SystemExit("the benchmark's corpus needs scikit-image's photographs: ./dev setup")
    return [(Image.open(folder / name).convert("RGB"), caption) for name, caption in PHOTOS.items()]


def _drawn(size: tuple[int, int], rng: np.random.Generator) -> tuple[Image.Image, str]:
    width, height = size
    background, first, second = rng.choice(COLOURS, size=3, replace=False)
    # Noise on the background so the encoders see texture, not flat colour.
    base = np.array(Image.new("RGB", size, str(background)), dtype=np.int16)  # (H, W, 3)
    noise = rng.integers(-24, 25, size=(height, width, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for colour, shape in ((first, draw.ellipse), (second, draw.rectangle)):
        radius = int(min(width, height) * rng.uniform(0.1, 0.3))
        cx = int(rng.integers(radius, width - radius))
        cy = int(rng.integers(radius, height - radius))
        shape((cx - radius, cy - radius, cx + radius, cy + radius), fill=str(colour))
    return image, f"a {first} circle and a {second} square on a {background} background"


def write_corpus(folder: Path, num_images: int, seed: int = 0) -> list[dict[str, str]]:
    """``num_images`` files (every third a photo crop, the rest drawn), JPEG and PNG, and the
    listing rows (uri, caption) that point at them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _photos()
    rows = []
    for index in range(num_images):
        if index % 3 == 0:
            photo, caption = photos[(index // 3) % len(photos)]
            # A random crop of 60-100% per side: every photo file differs in size and content.
            width, height = photo.size
            crop_w, crop_h = (int(side * rng.uniform(0.6, 1.0)) for side in (width, height))
            left, top = (
                int(rng.integers(0, width - crop_w + 1)),
                int(rng.integers(0, height - crop_h + 1)),
            )
            image = photo.crop((left, top, left + crop_w, top + crop_h))
        else:
            image, caption = _drawn(DRAWN_SIZES[index % len(DRAWN_SIZES)], rng)
        path = folder / f"image_{index:05d}.{'jpg' if index % 2 else 'png'}"
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        rows.append({"uri": str(path), "caption": caption})
    return rows


# ---------------------------------------------------------------------------------------
# Measuring: CPU and memory of this process tree, sampled in a thread
# ---------------------------------------------------------------------------------------


@dataclass
class Usage:
    wall_s: float = 0.0
    cpu_tree_s: float = 0.0  # CPU seconds of this process tree
    cpu_tree_util: float = 0.0  # cpu_tree_s / (wall * cores)
    cpu_machine_util: float = 0.0  # busy fraction of all cores, from /proc/stat
    cpu_others_util: float = 0.0  # machine minus tree: load from other tenants
    peak_rss_bytes: int = 0
    peak_pss_bytes: int = 0
    peak_processes: int = 0


class Sampler:
    """Samples the driver and all its descendants (Ray's GCS, raylet and workers, when this
    process started Ray) every ``SAMPLE_INTERVAL_S``: summed RSS and PSS, and CPU seconds."""

    def __init__(self) -> None:
        self.root = psutil.Process()
        self.cores = psutil.cpu_count()
        self.stop = threading.Event()
        self.first_cpu: dict[int, float] = {}
        self.last_cpu: dict[int, float] = {}
        self.usage = Usage()

    def _tree(self) -> list[psutil.Process]:
        return [self.root, *self.root.children(recursive=True)]

    def _sample(self) -> None:
        rss = pss = count = 0
        for process in self._tree():
            try:
                memory = process.memory_full_info()
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss, count = rss + memory.rss, pss + memory.pss, count + 1
            self.last_cpu[process.pid] = times.user + times.system
        usage = self.usage
        usage.peak_rss_bytes = max(usage.peak_rss_bytes, rss)
        usage.peak_pss_bytes = max(usage.peak_pss_bytes, pss)
        usage.peak_processes = max(usage.peak_processes, count)

    def _loop(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL_S):
            self._sample()

    def cpu_so_far(self) -> float:
        """CPU seconds of the tree since ``measure`` began, as of the last sample."""
        return sum(s - self.first_cpu.get(pid, 0.0) for pid, s in self.last_cpu.items())

    @contextmanager
    def measure(self) -> Iterator[Usage]:
        # Processes alive at the start count only the CPU they spend from now on.
        self._sample()
        self.first_cpu = dict(self.last_cpu)
        machine_before = psutil.cpu_times()
        started = time.perf_counter()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self.usage
        finally:
            self.stop.set()
            thread.join()
            self._sample()
            wall = time.perf_counter() - started
            machine_after = psutil.cpu_times()
            idle = (machine_after.idle + machine_after.iowait) - (
                machine_before.idle + machine_before.iowait
            )
            total = sum(machine_after) - sum(machine_before)
            tree_cpu = sum(
                seconds - self.first_cpu.get(pid, 0.0) for pid, seconds in self.last_cpu.items()
            )
            self.usage.wall_s = wall
            self.usage.cpu_tree_s = tree_cpu
            self.usage.cpu_tree_util = tree_cpu / (wall * self.cores)
            self.usage.cpu_machine_util = 1.0 - idle / total if total > 0 else 0.0
            self.usage.cpu_others_util = max(
                0.0, self.usage.cpu_machine_util - self.usage.cpu_tree_util
            )


def wait_for_quiet(max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until other tenants leave the cores idle: this machine is
    shared, and a run that starts under someone else's load measures their job, not ours.
    Returns the machine's busy fraction over the last second waited."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = psutil.cpu_percent(interval=QUIET_WINDOW_S) / 100
        if busy <= QUIET_BUSY or time.monotonic() > deadline:
            return busy


def measured(fn: Callable[[], Any]) -> tuple[Any, Usage]:
    sampler = Sampler()
    with sampler.measure() as usage:
        result = fn()
    return result, usage


@contextmanager
def first_shard(output: Path, sampler: Sampler) -> Iterator[dict[str, float]]:
    """Watches ``output/shards`` from a thread; the yielded dict gets ``seconds`` (since entering)
    and ``cpu_s`` (the sampler's tree) when the first shard file lands. Files are renamed
    into place whole, so a visible ``part-*.parquet`` is a written shard."""
    found: dict[str, float] = {}
    stop = threading.Event()
    started = time.perf_counter()

    def watch() -> None:
        while not stop.wait(0.05):
            if any((output / "shards").glob("*/part-*.parquet")):
                sampler._sample()
                found.update(seconds=time.perf_counter() - started, cpu_s=sampler.cpu_so_far())
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------
# The two contenders
# ---------------------------------------------------------------------------------------


@dataclass
class Run:
    contender: str  # "loop" | "flow"
    num_images: int
    repeat: int
    images_per_s: float
    num_written: int
    usage: Usage
    stage_throughput: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


# Which PrepConfig section's ``resources`` sets each stage's batch size (the flow's mapping).
STAGE_SECTIONS = {
    "fetch": "decode",
    "decode": "decode",
    "filter": "filters",
    "caption": "caption",
    "encode_text": "encode",
    "encode_latents": "encode",
}


def _split(batch: dict[str, np.ndarray], size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(next(iter(batch.values()))), size):
        yield {name: column[start : start + size] for name, column in batch.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def run_loop(config: PrepConfig) -> dict[str, Any]:
    """The prep stages called one after another in this process, each on batches of its own
    ``batch_size`` from ``config`` (the flow's), on chunks of the largest: what a user
    without Ray would write with the same classes."""
    storage = Storage(config.storage)
    config = preflight(config, storage)  # the flow's checks, and buckets.step from the bundles
    items = list_inputs(config, storage)
    started = time.perf_counter()
    bundles = (config.bundle, config.video_bundle, config.storage)
    stages = {
        "fetch": FetchMedia(config.decode, config.storage),
        "decode": MediaDecoder(config.decode, config.buckets),
        "filter": Filters(config.filters, config.storage),
        "caption": Captioner(config.caption, config.storage),
        "encode_text": TextEncoder(config.encode, *bundles),
        "encode_latents": LatentEncoder(config.encode, *bundles),
    }
    writer = ShardWriter(config.output, config.encode.latent_std, config.storage)
    load_s = time.perf_counter() - started
    batch_sizes = {
        name: getattr(config, section).resources.batch_size
        for name, section in STAGE_SECTIONS.items()
    }
    chunk = max(batch_sizes.values())
    seconds: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    for start in range(0, len(items), chunk):
        batch = rows_to_batch(items[start : start + chunk])
        for name, stage in stages.items():
            begun = time.perf_counter()
            batch = _concat([stage(part) for part in _split(batch, batch_sizes[name])])
            seconds[name] += time.perf_counter() - begun
        for name, values in writer(batch).items():
            totals[name] += int(np.sum(values))
    # The flow's manifest carries the empty prompt's embeddings and the VAE factors: same here.
    empty_prompt_embeddings(config)
    vae_factors(config)
    return {
        "num_written": totals["written"],
        "load_s": load_s,
        "stage_throughput": {name: totals["rows"] / s for name, s in seconds.items() if s > 0},
    }


def flow_actor_threads(num_cpus: float) -> int:
    """torch's intra-op threads in a Ray worker holding ``num_cpus``, as the flow's actors
    do (Ray sets OMP_NUM_THREADS from num_cpus, at least 1, before torch starts)."""

    @ray.remote(num_cpus=num_cpus)
    def threads() -> int:
        return torch.get_num_threads()

    return ray.get(threads.remote())


def time_loop(
    config: PrepConfig,
    num_images: int,
    repeat: int,
    threads: int,
    max_wait_s: float = QUIET_MAX_WAIT_S,
) -> Run:
    quiet = wait_for_quiet(max_wait_s)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result, usage = measured(lambda: run_loop(config))
    finally:
        torch.set_num_threads(previous)
    return Run(
        contender="loop",
        num_images=num_images,
        repeat=repeat,
        images_per_s=result["num_written"] / usage.wall_s,
        num_written=result["num_written"],
        usage=usage,
        stage_throughput=result["stage_throughput"],
        notes={"model_load_s": result["load_s"], "torch_threads": threads, "busy_before": quiet},
    )


def time_flow(
    config: PrepConfig,
    num_images: int,
    repeat: int,
    contender: str = "flow",
    max_wait_s: float = QUIET_MAX_WAIT_S,
) -> Run:
    quiet = wait_for_quiet(max_wait_s)
    # A fresh local Ray per run, started before the clock: a cluster is up before a job is
    # submitted, and no run inherits another's workers or object store. Ray is down while the
    # loop runs, so the loop never shares the cores with Ray's idle processes.
    init_started = time.perf_counter()
    init_ray(config.ray)
    init_s = time.perf_counter() - init_started
    ray.data.DataContext.get_current().enable_progress_bars = False  # display only
    try:
        # Not before a start-up run: its worker, torch imported, could become an actor.
        threads = 0 if contender != "flow" else flow_actor_threads(config.encode.resources.num_cpus)
        sampler = Sampler()
        with sampler.measure() as usage, first_shard(Path(config.output), sampler) as first:
            manifest = run_prep(config)
    finally:
        shutdown_ray()
    return Run(
        contender=contender,
        num_images=num_images,
        repeat=repeat,
        images_per_s=manifest.num_written / usage.wall_s,
        num_written=manifest.num_written,
        usage=usage,
        stage_throughput=dict(manifest.stage_throughput),
        notes={
            "ray_init_s": init_s,
            "first_shard_s": first["seconds"],
            # The clock of a `raygen prep` on a laptop: Ray starts inside the job.
            "start_to_first_shard_s": init_s + first["seconds"],
            "cpu_to_first_shard_s": first["cpu_s"],
            "actor_torch_threads": threads,
            "busy_before": quiet,
            "small_corpus_inputs": config.small_corpus_inputs,
        },
    )


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def make_config(
    bundles: dict[str, Path], listing: Path, output: Path, resolution: int, overrides: list[str]
) -> PrepConfig:
    values = {
        "input": str(listing),
        "output": str(output),
        "bundle.uri": str(bundles["t2i"]),
        "caption.model.uri": str(bundles["captioner"]),
        "buckets.resolution": resolution,
        "ray.num_cpus": NUM_CPUS,
        **FLOW_SETTINGS,
    }
    # Images only (no video bundle to load) and no CLIP scorer: the work the brief names.
    # One actor pool per model stage at N and 4N alike (what a large corpus runs), so the
    # steady state between them is the pipeline's, not a switch of layouts.
    fixed = ["video_bundle=null", "filters.scorer=null", "small_corpus_inputs=0"]
    return load_config(PrepConfig, values=values, overrides=[*fixed, *overrides])


def demo_config(data: Path, output: Path, small_corpus_inputs: int | None) -> PrepConfig:
    """The sample corpus's prep config (tiny bundles, every stage, default resources): what
    the earlier `raygen demo` ran, and tests/sample_prep.py runs for the tests."""
    values: dict[str, Any] = {
        "input": str(data / "corpus"),
        "output": str(output),
        "bundle.uri": str(data / "bundles" / "t2i"),
        "video_bundle.uri": str(data / "bundles" / "t2v"),
        "caption.model.uri": str(data / "bundles" / "captioner"),
        "filters.scorer.uri": str(data / "bundles" / "scorer"),
        "ray.num_cpus": NUM_CPUS,
    }
    if small_corpus_inputs is not None:
        values["small_corpus_inputs"] = small_corpus_inputs
    return load_config(PrepConfig, values=values)


def summarise_startup(runs: list[Run]) -> dict[str, Any]:
    """Medians per layout of the start-up runs on the demo corpus."""
    layouts: dict[str, Any] = {}
    for layout in sorted({run.contender for run in runs}):
        group = [run for run in runs if run.contender == layout]
        layouts[layout.removeprefix("startup_")] = {
            "runs": len(group),
            "inputs": group[0].num_images,
            "written": group[0].num_written,
            **{
                key: _median([run.notes[key] for run in group])
                for key in (
                    "start_to_first_shard_s",
                    "ray_init_s",
                    "first_shard_s",
                    "cpu_to_first_shard_s",
                )
            },
            "wall_s": _median([run.usage.wall_s for run in group]),
            "cpu_others_util": _median([run.usage.cpu_others_util for run in group]),
        }
    default = layouts["default"]["start_to_first_shard_s"]
    layouts["target_s"] = STARTUP_TARGET_S
    layouts["target_met"] = default <= STARTUP_TARGET_S
    return layouts


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _mib(num_bytes: float) -> float:
    return num_bytes / 2**20


def summarise(runs: list[Run], num_images: int) -> dict[str, Any]:
    def pick(contender: str, size: int, one_thread: bool = False) -> list[Run]:
        return [
            run
            for run in runs
            if run.contender == contender
            and run.num_images == size
            and (run.notes.get("torch_threads") == 1) == one_thread
            and run.repeat >= 0
        ]

    loop_n, flow_n = pick("loop", num_images), pick("flow", num_images)
    loop_1t = pick("loop", num_images, one_thread=True)
    loop_4n, flow_4n = pick("loop", 4 * num_images), pick("flow", 4 * num_images)
    loop_rate = _median([run.images_per_s for run in loop_n])
    flow_rate = _median([run.images_per_s for run in flow_n])
    loop_wall = _median([run.usage.wall_s for run in loop_n])
    flow_wall = _median([run.usage.wall_s for run in flow_n])
    stages = sorted({name for run in loop_n + flow_n for name in run.stage_throughput})
    summary: dict[str, Any] = {
        "images": num_images,
        "repeats_at_n": len(flow_n),
        "ratio": flow_rate / loop_rate,
        "flow_images_per_s": flow_rate,
        "loop_images_per_s": loop_rate,
        "loop_torch_threads": loop_n[0].notes["torch_threads"],
        "flow_start_to_first_shard_s": _median(
            [run.notes["start_to_first_shard_s"] for run in flow_n]
        ),
        # CPU seconds per image: a ratio above 1 needs the loop to leave cores idle, or the
        # flow to spend fewer CPU seconds per image than the loop.
        "cpu_s_per_image": {
            contender: _median([run.usage.cpu_tree_s / run.num_images for run in group])
            for contender, group in (("flow", flow_n), ("loop", loop_n))
        },
        "per_stage_rows_per_s": {
            name: {
                contender: _median([run.stage_throughput[name] for run in group])
                for contender, group in (("flow", flow_n), ("loop", loop_n))
                if all(name in run.stage_throughput for run in group)
            }
            for name in stages
        },
        "cpu_util": {
            contender: {
                key: _median([getattr(run.usage, f"cpu_{key}_util") for run in group])
                for key in ("tree", "machine", "others")
            }
            for contender, group in (("flow", flow_n), ("loop", loop_n))
        },
        "memory_mib": {
            "flow_peak_rss_n": _mib(_median([run.usage.peak_rss_bytes for run in flow_n])),
            "flow_peak_pss_n": _mib(_median([run.usage.peak_pss_bytes for run in flow_n])),
            "loop_peak_rss_n": _mib(_median([run.usage.peak_rss_bytes for run in loop_n])),
        },
    }
    if loop_1t:
        # The same loop on one torch thread: how much of the loop's speed is intra-op threads.
        one_thread = loop_1t[0].images_per_s
        summary["loop_one_thread_images_per_s"] = one_thread
        summary["loop_one_thread_cpu_util"] = loop_1t[0].usage.cpu_tree_util
        summary["loop_thread_speedup"] = loop_rate / one_thread
        summary["ratio_vs_one_thread_loop"] = flow_rate / one_thread
    if loop_4n and flow_4n:
        size = 4 * num_images
        summary["ratio_4n"] = flow_4n[0].images_per_s / loop_4n[0].images_per_s
        summary["flow_images_per_s_4n"] = flow_4n[0].images_per_s
        summary["loop_images_per_s_4n"] = loop_4n[0].images_per_s
        # Images per second between N and 4N: fixed costs (for the flow: worker start-up,
        # imports and model loads in every actor, the manifest task) cancel out.
        flow_marginal = (size - num_images) / (flow_4n[0].usage.wall_s - flow_wall)
        loop_marginal = (size - num_images) / (loop_4n[0].usage.wall_s - loop_wall)
        flow_cpu = _median([run.usage.cpu_tree_s for run in flow_n])
        loop_cpu = _median([run.usage.cpu_tree_s for run in loop_n])
        summary["steady_state"] = {
            "flow_images_per_s": flow_marginal,
            "loop_images_per_s": loop_marginal,
            "ratio": flow_marginal / loop_marginal,
            "flow_fixed_s": flow_wall - num_images / flow_marginal,
            "loop_fixed_s": loop_wall - num_images / loop_marginal,
            "flow_cpu_s_per_image": (flow_4n[0].usage.cpu_tree_s - flow_cpu) / (size - num_images),
            "loop_cpu_s_per_image": (loop_4n[0].usage.cpu_tree_s - loop_cpu) / (size - num_images),
        }
        if loop_1t:
            summary["steady_state"]["ratio_vs_one_thread_loop"] = flow_marginal / one_thread
        memory = summary["memory_mib"]
        memory["flow_peak_rss_4n"] = _mib(flow_4n[0].usage.peak_rss_bytes)
        memory["flow_peak_pss_4n"] = _mib(flow_4n[0].usage.peak_pss_bytes)
        memory["rss_ratio_4n_over_n"] = memory["flow_peak_rss_4n"] / memory["flow_peak_rss_n"]
        memory["pss_ratio_4n_over_n"] = memory["flow_peak_pss_4n"] / memory["flow_peak_pss_n"]
    memory_ratio = summary["memory_mib"].get("rss_ratio_4n_over_n")
    summary["targets"] = {
        "ratio_at_least": RATIO_TARGET,
        "ratio_met": summary["ratio"] >= RATIO_TARGET,
        "memory_ratio_at_most": MEMORY_FLAT_LIMIT,
        "memory_met": None if memory_ratio is None else memory_ratio <= MEMORY_FLAT_LIMIT,
    }
    summary["noisy_runs"] = [
        f"{run.contender} N={run.num_images} #{run.repeat}: other tenants "
        f"{run.usage.cpu_others_util:.0%}"
        for run in runs
        if run.usage.cpu_others_util > NOISY_OTHERS
    ]
    return summary


def report(summary: dict[str, Any]) -> str:
    n = summary["images"]
    lines = [
        f"prep benchmark, {n} images (median of {summary['repeats_at_n']} interleaved runs each):",
        f"  flow {summary['flow_images_per_s']:.2f} images/s, loop "
        f"{summary['loop_images_per_s']:.2f} images/s ({summary['loop_torch_threads']} torch "
        f"threads): ratio {summary['ratio']:.2f}x (target >= {RATIO_TARGET})",
    ]
    if "loop_one_thread_images_per_s" in summary:
        lines.append(
            f"  loop on 1 torch thread: {summary['loop_one_thread_images_per_s']:.2f} images/s "
            f"(threads give the loop x{summary['loop_thread_speedup']:.2f}); flow vs it: "
            f"{summary['ratio_vs_one_thread_loop']:.2f}x"
        )
    cpu_s = summary["cpu_s_per_image"]
    lines.append(
        f"  CPU seconds per image at N: flow {cpu_s['flow']:.2f}, loop {cpu_s['loop']:.2f}"
    )
    if "steady_state" in summary:
        steady = summary["steady_state"]
        lines += [
            f"  at {4 * n} images (1 run each): flow {summary['flow_images_per_s_4n']:.2f}, loop "
            f"{summary['loop_images_per_s_4n']:.2f} images/s: ratio {summary['ratio_4n']:.2f}x",
            f"  steady state (N -> 4N): flow {steady['flow_images_per_s']:.2f}, loop "
            f"{steady['loop_images_per_s']:.2f} images/s: ratio {steady['ratio']:.2f}x; fixed "
            f"cost flow {steady['flow_fixed_s']:.0f}s, loop {steady['loop_fixed_s']:.0f}s",
            f"  steady-state CPU seconds per image: flow {steady['flow_cpu_s_per_image']:.2f}, "
            f"loop {steady['loop_cpu_s_per_image']:.2f}",
        ]
        if "ratio_vs_one_thread_loop" in steady:
            lines.append(
                f"  steady-state flow vs the loop on 1 torch thread: "
                f"{steady['ratio_vs_one_thread_loop']:.2f}x"
            )
    lines.append("  per stage, rows/s (flow: of one actor's busy time; loop: of the process's):")
    for name, rates in summary["per_stage_rows_per_s"].items():
        cells = ", ".join(f"{contender} {rate:.1f}" for contender, rate in rates.items())
        lines.append(f"    {name:15s} {cells}")
    for contender, cpu in summary["cpu_util"].items():
        lines.append(
            f"  CPU during {contender}: its process tree {cpu['tree']:.0%} of "
            f"{psutil.cpu_count()} cores, machine {cpu['machine']:.0%}, others {cpu['others']:.0%}"
        )
    memory = summary["memory_mib"]
    lines.append(
        f"  peak memory, summed over processes: loop RSS {memory['loop_peak_rss_n']:.0f} MiB; "
        f"flow RSS {memory['flow_peak_rss_n']:.0f} MiB (PSS {memory['flow_peak_pss_n']:.0f}) at N"
    )
    if "rss_ratio_4n_over_n" in memory:
        lines.append(
            f"  flow at 4N: RSS {memory['flow_peak_rss_4n']:.0f} MiB (PSS "
            f"{memory['flow_peak_pss_4n']:.0f}): x{memory['rss_ratio_4n_over_n']:.2f} of N "
            f"(PSS x{memory['pss_ratio_4n_over_n']:.2f}; target <= {MEMORY_FLAT_LIMIT})"
        )
    startup = summary.get("startup")
    if startup:
        for layout in ("default", "per_stage_pools"):
            if layout not in startup:
                continue
            row = startup[layout]
            lines.append(
                f"  start-up, demo corpus ({row['inputs']} inputs), {layout}: first shard "
                f"{row['start_to_first_shard_s']:.1f}s after the start (Ray "
                f"{row['ray_init_s']:.1f}s + job {row['first_shard_s']:.1f}s; "
                f"{row['cpu_to_first_shard_s']:.0f} CPU s), "
                f"job {row['wall_s']:.1f}s; median of {row['runs']}, others "
                f"{row['cpu_others_util']:.0%} of the cores"
            )
        lines.append(
            f"  start-up target: first shard <= {STARTUP_TARGET_S:.0f}s: "
            f"{'met' if startup['target_met'] else 'NOT met'}"
        )
    for line in summary["noisy_runs"]:
        lines.append(f"  NOISY: {line}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="corpus size N (4N runs too)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each at N")
    parser.add_argument("--resolution", type=int, default=256, help="buckets.resolution")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="N=8 and 4N, 1 repeat, no 1-thread run, 1 start-up run: < 3 minutes",
    )
    parser.add_argument("--no-4n", dest="four_n", action="store_false", help="skip the 4N runs")
    parser.add_argument(
        "--loop-threads", type=int, default=None, help="torch threads of the loop (default: all)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="a PrepConfig override for both contenders, key.path=value (repeatable)",
    )
    parser.add_argument(
        "--startup-repeats",
        type=int,
        default=3,
        help="start-up runs on the demo corpus, of each layout (0: none)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="keep bundles and corpus here")
    args = parser.parse_args(argv)
    args.max_wait_s = QUIET_MAX_WAIT_S
    args.warmup_images = WARMUP_IMAGES
    args.startup_layouts = ["default", "per_stage_pools"]
    if args.quick:
        # N and 4N for the steady state, one start-up run of the default layout, short
        # waits for a quiet machine: under 3 minutes on 2 cores.
        args.images, args.repeats, args.four_n = 8, 1, True
        args.startup_repeats, args.startup_layouts = min(args.startup_repeats, 1), ["default"]
        args.max_wait_s, args.warmup_images = 5.0, 2
    return args


def quiet_model_logs() -> None:
    """Silence the libraries' per-load progress bars and notices in this process and in the
    Ray workers it starts (they inherit the environment): display only, no effect on work."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_model_logs()
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="raygen-bench-prep-"))
    try:
        bundles, models = build_benchmark_bundles(workdir / "bundles")
        models["text_encoders"] = {
            "classes": "CLIPTextModelWithProjection x2 + T5EncoderModel (the tiny t2i bundle's)",
            "params": text_encoder_params(bundles["t2i"]),
        }
        # One corpus of 4N files; N and 4N are listings over it (the N runs read the first N).
        num_images = args.images
        sizes = [num_images, 4 * num_images] if args.four_n else [num_images]
        corpus = write_corpus(workdir / "corpus", max(sizes))
        listings: dict[Any, Path] = {}
        for size in sizes:
            listings[size] = workdir / f"listing_{size}.jsonl"
            write_listing(listings[size], corpus[:size])
        listings["warmup"] = workdir / "listing_warmup.jsonl"
        warmup = write_corpus(workdir / "warmup", args.warmup_images, seed=1)
        write_listing(listings["warmup"], warmup)
        # The demo's corpus and tiny bundles, for the start-up runs.
        demo = workdir / "demo"
        if args.startup_repeats:
            build_tiny_bundles(demo / "bundles")
            build_sample_corpus(demo / "corpus")
        outputs = iter(range(10**6))

        def config(listing: Any) -> PrepConfig:
            # A fresh output folder per run: into a used one, prep would resume and skip all.
            output = workdir / "out" / f"run_{next(outputs):03d}"
            return make_config(bundles, listings[listing], output, args.resolution, args.overrides)

        loop_threads = args.loop_threads or torch.get_num_threads()
        # Warm-up, not counted: the loop's lazy imports and first calls, the page cache.
        print(f"warm-up on {args.warmup_images} images ...", flush=True)
        time_loop(config("warmup"), args.warmup_images, -1, loop_threads, args.max_wait_s)

        # (contender, size, repeat, loop threads); at N both alternate who goes first, so a
        # drifting background load hits both alike.
        plan: list[tuple[str, int, int, int]] = []
        for repeat in range(args.repeats):
            pair = [("loop", num_images, repeat, loop_threads), ("flow", num_images, repeat, 0)]
            plan += pair if repeat % 2 == 0 else pair[::-1]
        if args.four_n:
            plan += [("loop", 4 * num_images, 0, loop_threads), ("flow", 4 * num_images, 0, 0)]
            if loop_threads != 1 and not args.quick:
                plan.append(("loop", num_images, 0, 1))
        # Start-up on the demo corpus: the default layout (its model stages share one actor)
        # and one actor pool per model stage, alternating who goes first.
        for repeat in range(args.startup_repeats):
            layouts = [f"startup_{layout}" for layout in args.startup_layouts]
            plan += [(layout, 0, repeat, 0) for layout in layouts[:: 1 if repeat % 2 == 0 else -1]]

        runs: list[Run] = []
        for contender, size, repeat, threads in plan:
            if contender == "loop":
                run = time_loop(config(size), size, repeat, threads, args.max_wait_s)
            elif contender == "flow":
                run = time_flow(config(size), size, repeat, max_wait_s=args.max_wait_s)
            else:
                output = workdir / "out" / f"run_{next(outputs):03d}"
                small = 0 if contender == "startup_per_stage_pools" else None
                startup_config = demo_config(demo, output, small)
                num_inputs = len(list_inputs(startup_config, Storage()))
                run = time_flow(startup_config, num_inputs, repeat, contender, args.max_wait_s)
            if not contender.startswith("startup"):
                assert run.num_written == size, f"{contender} wrote {run.num_written} of {size}"
            runs.append(run)
            label = f"{contender}{f' ({threads} threads)' if contender == 'loop' else ''}"
            if contender != "loop":
                label += f" (first shard {run.notes['start_to_first_shard_s']:.1f}s from start)"
            print(
                f"{label} N={size} #{repeat}: {run.images_per_s:.2f} images/s in "
                f"{run.usage.wall_s:.1f}s; CPU tree {run.usage.cpu_tree_util:.0%}, machine "
                f"{run.usage.cpu_machine_util:.0%}; peak RSS {_mib(run.usage.peak_rss_bytes):.0f} "
                f"MiB, PSS {_mib(run.usage.peak_pss_bytes):.0f} MiB",
                flush=True,
            )

        startup_runs = [run for run in runs if run.contender.startswith("startup")]
        summary = summarise([run for run in runs if run not in startup_runs], num_images)
        if startup_runs:
            summary["startup"] = summarise_startup(startup_runs)
        result = {
            "benchmark": "prep",
            "command": " ".join(["python -m benchmarks.prep", *(argv or sys.argv[1:])]),
            "machine": {
                "cores": psutil.cpu_count(),
                "memory_gib": psutil.virtual_memory().total / 2**30,
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "ray": ray.__version__,
            },
            "settings": {
                "images": num_images,
                "repeats": args.repeats,
                "resolution": args.resolution,
                "ray_num_cpus": NUM_CPUS,
                "warmup_images": args.warmup_images,
                "startup_repeats": args.startup_repeats,
                "quick": args.quick,
                "loop_torch_threads": loop_threads,
                "flow_actor_torch_threads": next(
                    run.notes["actor_torch_threads"] for run in runs if run.contender == "flow"
                ),
                "flow_settings": FLOW_SETTINGS,
                "overrides": args.overrides,
                "flow_config": json.loads(config(num_images).model_dump_json()),
            },
            "models": models,
            "summary": summary,
            "runs": [asdict(run) for run in runs],
            "total_s": time.perf_counter() - started,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(report(summary))
        print(f"JSON: {args.out} (whole benchmark {result['total_s']:.0f}s)")
        return result
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
