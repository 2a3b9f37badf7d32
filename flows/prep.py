"""`raygen prep`: a raw image/video corpus in, training shards and a manifest out.

One streaming Ray Data pipeline; every stage is an ``actors/`` class with its own resources
from ``PrepConfig``, so the corpus is never materialised and memory stays bounded:

    list inputs (driver)
      -> FetchMedia     read bytes; expand WebDataset tars; attach captions
      -> MediaDecoder   decode, validate (bad input -> quarantine), bucket + crop, video clips
      -> skip written   resume: drop samples a previous run already wrote
      -> Filters        min resolution, CLIP score, aesthetic / NSFW hooks
      -> Captioner      synthetic captions from a vision-language model
      -> TextEncoder    the bundle's text encoders, both captions
      -> LatentEncoder  the bundle's VAE (AutoencoderKL for images, Wan VAE for video)
      -> ShardWriter    parquet by bucket + quarantine / filtered tables, each file atomic

Stages without a model (fetch, decode, the writer) run as Ray Data tasks on Ray's pooled
workers; each model stage gets an actor pool of its own, except on a small corpus
(``small_corpus_inputs``), where the four share one actor: there, start-up (each actor
process importing torch and loading its models) is what the job would wait for.

Resume: the written files are the ledger. Inputs whose every row is written are not even
read again; a partly written input (a video whose clips straddled a crash) is decoded again
and only its missing rows go on. A re-run therefore ends with exactly one row per valid input.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import ray
from safetensors.numpy import save as save_safetensors

from actors.batches import restore_optional_text
from actors.decode import MediaDecoder
from actors.families import family_of
from actors.sources import FetchMedia, list_inputs
from actors.writer import ShardWriter
from cluster.bundles import validate_bundle
from cluster.ray_runtime import init_ray
from cluster.storage import Storage, is_s3, join
from schemas.config import ConfigError, ModelRef, PrepConfig, StageResources
from schemas.errors import RaygenError
from schemas.shards import (
    BUCKET,
    EMPTY_PROMPT_NAME,
    FILTERED_DIR,
    ITEM_SOURCES,
    ITEM_URI,
    LEDGER_COLUMNS,
    MANIFEST_NAME,
    QUARANTINE_DIR,
    REASON,
    SAMPLE_ID,
    SHARDS_DIR,
    SOURCE_ROWS,
    SOURCE_URI,
    Manifest,
)


@dataclass
class Ledger:
    """What earlier runs wrote, read back from the output's own files."""

    sample_ids: set[str] = field(default_factory=set)
    complete_items: set[str] = field(default_factory=set)


def _tables(output: str, storage: Storage, folder: str, columns: list[str]) -> Any:
    """All parquet rows under ``output/folder`` (only ``columns``), or None when empty."""
    uri = join(output, folder)
    if not storage.exists(uri):
        return None
    fs, path = storage.filesystem(uri)
    # Hidden names are temp files of writes in flight (or killed): never data.
    dataset = pads.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    return dataset.to_table(columns=columns)


def read_ledger(output: str, storage: Storage) -> Ledger:
    """Which samples and which whole inputs are already written under ``output``."""
    ledger = Ledger()
    rows_per_source: Counter[str] = Counter()
    expected_rows: dict[str, int] = {}
    item_of: dict[str, str] = {}
    expected_sources: dict[str, int] = {}
    for folder in (SHARDS_DIR, QUARANTINE_DIR, FILTERED_DIR):
        table = _tables(output, storage, folder, LEDGER_COLUMNS)
        if table is None:
            continue
        columns = table.to_pydict()
        ledger.sample_ids.update(columns[SAMPLE_ID])
        for source, item, sources, rows in zip(
            columns[SOURCE_URI], columns[ITEM_URI], columns[ITEM_SOURCES], columns[SOURCE_ROWS],
            strict=True,
        ):
            rows_per_source[source] += 1
            expected_rows[source] = rows
            item_of[source] = item
            expected_sources[item] = sources
    complete_sources: Counter[str] = Counter(
        item_of[source] for source, rows in rows_per_source.items() if rows >= expected_rows[source]
    )
    ledger.complete_items = {
        item for item, count in complete_sources.items() if count >= expected_sources[item]
    }
    return ledger


class SkipWritten:
    """Drop rows an earlier run already wrote (the done set comes via the object store)."""

    def __init__(self, done: list[ray.ObjectRef]) -> None:
        self.done: set[str] = ray.get(done[0])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([sample_id not in self.done for sample_id in batch[SAMPLE_ID]], dtype=bool)
        return {name: column[keep] for name, column in batch.items()}


def ray_stage(cls: type, stage: str) -> type:
    """``cls`` as a Ray Data stage: its calls add ``seconds_<stage>`` per row (summed by the
    writer into the manifest's per-stage throughput) and see missing text as None again."""

    class RayStage(cls):  # type: ignore[misc, valid-type]
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            started = time.perf_counter()
            out = super().__call__(restore_optional_text(batch))
            elapsed = time.perf_counter() - started
            num_rows = len(out["sample_id"])
            # A stage that splits rows (a video into clips) copies earlier stages' seconds to
            # every piece: rescale them so each stage's total stays what it measured.
            for name in batch:
                if name.startswith("seconds_") and name in out:
                    before, after = float(np.sum(batch[name])), float(np.sum(out[name]))
                    if after > 0:
                        out[name] = np.asarray(out[name], dtype=np.float64) * (before / after)
            out[f"seconds_{stage}"] = np.full(num_rows, elapsed / max(num_rows, 1))
            return out

    RayStage.__name__ = RayStage.__qualname__ = cls.__name__
    return RayStage


def model_stage(path: str, stage: str) -> type:
    """The model stage at ``path`` ("module:Class") as a Ray Data stage, its module imported by
    the actor process that runs it, not by the job's driver (the model stages' modules import
    torch and transformers: seconds of the driver's start-up)."""
    module, name = path.split(":")

    class ModelStage:
        def __init__(self, **kwargs: Any) -> None:
            cls = getattr(importlib.import_module(module), name)
            self.stage = ray_stage(cls, stage)(**kwargs)

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return self.stage(batch)

    # Ray Data names the actors after the class: MapWorker(MapBatches(Captioner)).
    ModelStage.__name__ = ModelStage.__qualname__ = name
    return ModelStage


def task_stage(cls: type) -> Any:
    """``cls`` (a stage that holds no model) as a Ray Data task function: the object is built
    per batch, which costs microseconds, so the stage runs on Ray's pooled workers instead of
    starting an actor process of its own."""

    def run(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
        return cls(**kwargs)(batch)

    run.__name__ = run.__qualname__ = cls.__name__
    return run


def _split(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    num_rows = len(batch["sample_id"])
    return [
        {name: column[start : start + size] for name, column in batch.items()}
        for start in range(0, max(num_rows, 1), size)
    ]


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


class ModelStages:
    """Several model stages in one actor, called in order, each on batches of its own size.

    What a small corpus runs instead of one actor pool per model: every actor process pays
    its interpreter, torch / transformers / diffusers imports and model loads before its
    first row, seconds each, which on a few dozen inputs is most of the job.
    """

    def __init__(self, stages: list[tuple[str, str, int, dict[str, Any]]]) -> None:
        """``stages``: (import path, stage name, batch size, constructor kwargs) each."""
        self.stages = [
            (model_stage(path, stage)(**kwargs), batch_size)
            for path, stage, batch_size, kwargs in stages
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage, batch_size in self.stages:
            batch = _concat([stage(part) for part in _split(batch, batch_size)])
        return batch


def _map(ds: ray.data.Dataset, path: str, stage: str, resources: StageResources, **kwargs: Any):
    return ds.map_batches(
        model_stage(path, stage),
        fn_constructor_kwargs=kwargs,
        batch_format="numpy",
        batch_size=resources.batch_size,
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )


def map_tasks(
    ds: ray.data.Dataset, cls: type, stage: str, resources: StageResources, **kwargs: Any
):
    return ds.map_batches(
        task_stage(ray_stage(cls, stage)),
        fn_kwargs=kwargs,
        batch_format="numpy",
        batch_size=resources.batch_size,
        compute=ray.data.TaskPoolStrategy(size=resources.concurrency),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )


def is_small_corpus(items: list[dict[str, Any]], config: PrepConfig, storage: Storage) -> bool:
    """At most ``config.small_corpus_inputs`` inputs, a WebDataset tar counting one per MiB:
    its number of samples is unknown until it is read, and a sample is rarely smaller, so a
    few large tars never pass for a small corpus."""
    if len(items) > config.small_corpus_inputs:
        return False
    count = 0
    for item in items:
        if item["kind"] == "tar":
            fs, path = storage.filesystem(item["item_uri"])
            size = fs.get_file_info(path).size or 0  # a missing tar: quarantined later
            count += max(1, math.ceil(size / 2**20))
        else:
            count += 1
    return count <= config.small_corpus_inputs


def _map_models(ds: ray.data.Dataset, config: PrepConfig, small: bool) -> ray.data.Dataset:
    """Filters -> Captioner -> TextEncoder -> LatentEncoder: one actor pool each, or, on a
    small corpus whose stages would share one GPU anyway, one actor holding them all."""
    storage = {"storage": config.storage}
    bundles = {"bundle": config.bundle, "video_bundle": config.video_bundle, **storage}
    stages = [
        ("actors.filters:Filters", "filter", config.filters.resources,
         {"config": config.filters, **storage}),
        ("actors.captioner:Captioner", "caption", config.caption.resources,
         {"config": config.caption, **storage}),
        ("actors.encoders:TextEncoder", "encode_text", config.encode.resources,
         {"config": config.encode, **bundles}),
        ("actors.encoders:LatentEncoder", "encode_latents", config.encode.resources,
         {"config": config.encode, **bundles}),
    ]  # fmt: skip
    num_gpus = sum(resources.num_gpus for _, _, resources, _ in stages)
    if not small or num_gpus > 1:
        for path, stage, resources, kwargs in stages:
            ds = _map(ds, path, stage, resources, **kwargs)
        return ds
    return ds.map_batches(
        ModelStages,
        fn_constructor_kwargs={
            "stages": [
                (path, stage, resources.batch_size, kwargs)
                for path, stage, resources, kwargs in stages
            ],
        },
        batch_format="numpy",
        batch_size=max(resources.batch_size for _, _, resources, _ in stages),
        compute=ray.data.ActorPoolStrategy(size=1),
        # What the separate pools would have held together, so the same models fit.
        num_cpus=sum(resources.num_cpus for _, _, resources, _ in stages),
        num_gpus=num_gpus,
    )


def _model_refs(config: PrepConfig) -> list[ModelRef]:
    refs = [config.bundle, config.video_bundle, config.caption.model, config.filters.scorer]
    refs += [config.filters.aesthetic, config.filters.nsfw]
    return [ref for ref in refs if ref is not None]


def preflight(config: PrepConfig, storage: Storage) -> PrepConfig:
    """Fail in seconds, naming the field, before any worker starts. Returns the config with
    what the bundles decide filled in: ``buckets.step`` when it is null."""
    storage.check(config.input)
    storage.check(config.output)
    for ref in _model_refs(config):
        # Only that each bundle is there: workers download and load it themselves, the
        # driver (often a small head node) never holds the weights.
        if is_s3(ref.uri):
            storage.check(ref.uri)
            if not storage.exists(ref.uri):
                raise RaygenError(f"bundle {ref.uri}: no files under it")
        else:
            validate_bundle(ref.uri)
    # What the bundles' families need of the data, from their configs alone.
    refs = {"image": config.bundle, "video": config.video_bundle}
    multiples = {
        media: family_of(ref.uri, storage, media=media).multiples(ref.uri, storage)
        for media, ref in refs.items()
        if ref is not None
    }
    if "video" in multiples:
        multiples["video"].check_frames(config.decode.video_num_frames, "decode.video_num_frames")
    size = math.lcm(*(m.size for m in multiples.values()))
    if config.buckets.step is None:
        return config.model_copy(
            update={"buckets": config.buckets.model_copy(update={"step": size})}
        )
    if config.buckets.step % size:
        raise ConfigError(
            f"buckets.step: {config.buckets.step} is not a multiple of {size}, the bundles' VAE "
            f"downscale x patch size: training could not patch every bucket's latents"
        )
    return config


@ray.remote
def _bundle_facts(config: PrepConfig) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """On a worker (it loads text encoders and reads VAE configs, never on the driver): the
    empty prompt's embeddings as safetensors and the VAEs' latent factors."""
    from actors.encoders import empty_prompt_embeddings, vae_factors

    return save_safetensors(empty_prompt_embeddings(config)), vae_factors(config)


def run_prep(config: PrepConfig) -> Manifest:
    started = time.perf_counter()
    storage = Storage(config.storage)
    config = preflight(config, storage)

    # ---- resume: what is already written ------------------------------------------------
    ledger = read_ledger(config.output, storage)
    items = list_inputs(config, storage)
    todo = [item for item in items if item["item_uri"] not in ledger.complete_items]
    print(
        f"prep: {len(items)} inputs under {config.input}; "
        f"{len(items) - len(todo)} already written, {len(todo)} to do"
    )

    # ---- the pipeline -------------------------------------------------------------------
    init_ray(config.ray)
    totals: Counter[str] = Counter()
    if todo:
        ds = ray.data.from_items(todo)
        # Stages without a model are tasks (Ray Data fuses fetch and decode into one), so
        # only the model stages start actor processes.
        ds = map_tasks(ds, FetchMedia, "fetch", config.decode.resources,
                       config=config.decode, storage=config.storage)
        ds = map_tasks(ds, MediaDecoder, "decode", config.decode.resources,
                       config=config.decode, bucket_config=config.buckets)
        if ledger.sample_ids:
            done = [ray.put(ledger.sample_ids)]
            ds = ds.map_batches(SkipWritten, fn_constructor_kwargs={"done": done},
                                batch_format="numpy", num_cpus=0.1,
                                compute=ray.data.ActorPoolStrategy(size=1))
        ds = _map_models(ds, config, is_small_corpus(todo, config, storage))
        ds = ds.map_batches(
            task_stage(ShardWriter),
            fn_kwargs={
                "output": config.output,
                "latent_std": config.encode.latent_std,
                "storage": config.storage,
            },
            batch_format="numpy",
            batch_size=config.rows_per_file,
            num_cpus=0.25,
            compute=ray.data.TaskPoolStrategy(size=config.write_concurrency),
        )
        # On a terminal Ray Data draws the live bar; elsewhere a line per written batch.
        lines = not sys.stdout.isatty()
        for stats in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for name, values in stats.items():
                totals[name] += float(np.sum(values))
            if lines:
                print(
                    f"prep: {totals['rows']:.0f} rows done ({totals['written']:.0f} written, "
                    f"{totals['quarantined']:.0f} quarantined, {totals['filtered']:.0f} "
                    f"filtered) in {time.perf_counter() - started:.0f}s",
                    flush=True,
                )

    # ---- manifest -------------------------------------------------------------------------
    manifest_uri = join(config.output, MANIFEST_NAME)
    empty_prompt, vae = ray.get(_bundle_facts.remote(config))
    storage.write_bytes(join(config.output, EMPTY_PROMPT_NAME), empty_prompt)
    manifest = build_manifest(config, storage, time.perf_counter() - started, totals, vae)
    storage.write_bytes(manifest_uri, manifest.model_dump_json(indent=2).encode())
    print(summary(manifest, manifest_uri))
    return manifest


def build_manifest(
    config: PrepConfig,
    storage: Storage,
    wall_seconds: float,
    totals: Counter[str],
    vae: dict[str, dict[str, Any]],
) -> Manifest:
    """Counts come from every file in the output (all runs), throughput from this run."""
    shards = _tables(config.output, storage, SHARDS_DIR, [SOURCE_URI, BUCKET])
    rejects = {
        folder: _tables(config.output, storage, folder, [SOURCE_URI, REASON])
        for folder in (QUARANTINE_DIR, FILTERED_DIR)
    }
    sources: set[str] = set()
    buckets: Counter[str] = Counter()
    if shards is not None:
        sources.update(shards.column(SOURCE_URI).to_pylist())
        buckets.update(shards.column(BUCKET).to_pylist())
    reasons: dict[str, Counter[str]] = {folder: Counter() for folder in rejects}
    for folder, table in rejects.items():
        if table is not None:
            sources.update(table.column(SOURCE_URI).to_pylist())
            reasons[folder].update(table.column(REASON).to_pylist())
    files = [
        uri.removeprefix(config.output.rstrip("/") + "/")
        for uri in storage.list(join(config.output, SHARDS_DIR))
        if uri.endswith(".parquet") and "/." not in uri
    ]
    throughput = {
        name.removeprefix("seconds_"): totals["rows"] / seconds
        for name, seconds in totals.items()
        if name.startswith("seconds_") and seconds > 0
    }
    return Manifest(
        bundle_uri=config.bundle.uri,
        config=json.loads(config.model_dump_json()),
        num_inputs=len(sources),
        num_written=sum(buckets.values()),
        filtered=dict(reasons[FILTERED_DIR]),
        quarantined=dict(reasons[QUARANTINE_DIR]),
        quarantine_uri=join(config.output, QUARANTINE_DIR),
        shards=sorted(files),
        buckets=dict(sorted(buckets.items())),
        vae=vae,
        empty_prompt=EMPTY_PROMPT_NAME,
        wall_seconds=wall_seconds,
        stage_throughput=throughput,
    )


def summary(manifest: Manifest, manifest_uri: str) -> str:
    out = io.StringIO()
    out.write(f"prep: {manifest.num_written} rows written from {manifest.num_inputs} inputs "
              f"in {manifest.wall_seconds:.1f}s\n")
    for title, counts in (("quarantined", manifest.quarantined), ("filtered", manifest.filtered)):
        if counts:
            detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            out.write(f"  {title}: {sum(counts.values())} ({detail})\n")
    buckets = ", ".join(f"{b}: {n}" for b, n in manifest.buckets.items())
    out.write(f"  buckets: {buckets or 'none'}\n")
    if manifest.stage_throughput:
        rates = ", ".join(f"{s} {r:.1f}/s" for s, r in manifest.stage_throughput.items())
        out.write(f"  per-actor throughput: {rates}\n")
    out.write(f"  manifest: {manifest_uri}")
    return out.getvalue()
