"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard event files in
``{output}/tensorboard`` by default, and MLflow or Weights & Biases when the config names them.

Ray Train's controller drives this (flows/train_log.py's MetricsLog): it sees every record
once, after a restarted worker group has been deduplicated. Each backend is imported at the
first record, when the workers are already training, never when the controller starts.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from cluster.storage import Storage, is_s3, join, local_path
from schemas.config import ConfigError, TrackingConfig

TRACKING_STATE = "tracking.json"  # the run ids a resumed run continues
# Record fields that are not curves.
NOT_SCALARS = {"step", "epoch", "time", "resumed_from_step"}


def check_installed(config: TrackingConfig) -> None:
    """Before a run starts: a tracker the config names whose package is missing."""
    for name, package in (("mlflow", "mlflow-skinny"), ("wandb", "wandb")):
        if getattr(config, name) and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"tracking.{name}: {getattr(config, name)} needs the {package} package "
                f"(pip install {package}, or raygen[tracking])"
            )


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers, by name (the step and bookkeeping left out)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS and isinstance(value, int | float) and not isinstance(value, bool)
    }


class Tracker(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...
    def image(self, step: int, tag: str, png: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files with ``torch.utils.tensorboard``'s SummaryWriter. A step logged again (a
    worker group restarted from its checkpoint, or a resumed run) opens a new event file with
    ``purge_step``, so TensorBoard drops the earlier values of those steps. An ``s3://``
    output is written locally and uploaded on ``flush``, whole files, at checkpoints."""

    def __init__(self, output: str, storage: Storage) -> None:
        self.storage = storage
        self.remote = join(output, "tensorboard") if is_s3(output) else None
        self.folder = (
            Path(tempfile.mkdtemp(prefix="raygen-tb-"))
            if self.remote
            else local_path(join(output, "tensorboard"))
        )
        self.writer: Any = None
        self.last_step = -1

    def _writer_for(self, step: int) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None or step <= self.last_step:
            if self.writer is not None:
                self.writer.close()
            # purge_step: a fresh writer on an existing folder (a resumed run) or a repeated
            # step discards what the folder holds from that step on.
            self.writer = SummaryWriter(str(self.folder), purge_step=step, flush_secs=30)
        return self.writer

    def log(self, step: int, scalars: dict[str, float]) -> None:
        writer = self._writer_for(step)
        for key, value in scalars.items():
            writer.add_scalar(_tag(key), value, step)
        self.last_step = step

    def image(self, step: int, tag: str, png: bytes) -> None:
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8
        # The grid of a step already logged goes to the same writer (no purge of that step).
        writer = self.writer if step == self.last_step else self._writer_for(step)
        writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        if self.remote:
            self.storage.upload_dir(self.folder, self.remote)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tag(key: str) -> str:
    # Held-out scores in one TensorBoard section: eval_color -> eval/color.
    return key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"train/{key}"


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (no process-global active run on the
    controller): metrics by step, the config as params, sample grids as images."""

    def __init__(
        self, config: TrackingConfig, run_name: str, params: dict[str, Any], run_id: str | None
    ) -> None:
        uri = config.mlflow or ""
        if uri.startswith("file:") or "://" not in uri:
            # A local mlruns folder is what the config asked for: MLflow 3 otherwise refuses
            # its file store (in maintenance mode, still read by `mlflow ui`).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            experiment = self.client.get_experiment_by_name(config.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(config.experiment)
            )
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            flat = _flatten(params)
            # MLflow takes at most 100 params a call and 6000 characters a value.
            items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
            for start in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[start : start + 100])
        self.run_id = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # A repeated step (a restart) is another point at that step: MLflow keeps both.
        metrics = [Metric(_tag(key), value, now, step) for key, value in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, step: int, tag: str, png: bytes) -> None:
        from PIL import Image

        self.client.log_image(self.run_id, Image.open(io.BytesIO(png)), key=tag, step=step)

    def flush(self) -> None:
        pass  # every call above is written when it returns

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """A Weights & Biases run (``wandb.init`` with a fixed id, so a resumed run continues it).
    W&B steps only go forward: the steps a restarted group repeats are not sent again."""

    def __init__(
        self,
        config: TrackingConfig,
        output: str,
        run_name: str,
        params: dict[str, Any],
        run_id: str | None,
    ) -> None:
        import wandb

        self.run_id = run_id or uuid.uuid4().hex[:12]
        # Its local files (offline runs, the sync queue) beside the run's output when that is
        # a folder; $WANDB_DIR wins, as W&B users expect.
        folder = os.environ.get("WANDB_DIR") or (
            tempfile.mkdtemp(prefix="raygen-wandb-") if is_s3(output) else str(local_path(output))
        )
        self.run = wandb.init(
            project=config.wandb,
            name=run_name,
            id=self.run_id,
            resume="allow",
            dir=folder,
            config=params,
            mode=config.wandb_mode,
        )
        self.last_step = -1

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.last_step:
            self.run.log({_tag(key): value for key, value in scalars.items()}, step=step)
            self.last_step = step

    def image(self, step: int, tag: str, png: bytes) -> None:
        import wandb
        from PIL import Image

        if step >= self.last_step:
            self.run.log({tag: wandb.Image(Image.open(io.BytesIO(png)))}, step=step)
            self.last_step = step

    def flush(self) -> None:
        pass  # wandb's own process streams the run

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker the config names, as one. Run ids are kept in ``tracking.json`` in the
    output, so ``--resume`` continues the same MLflow and W&B runs. A tracker that raises
    (its server down, its package missing) is dropped and its error kept for ``take_errors``:
    a run's metrics must not stop its training."""

    def __init__(
        self, config: TrackingConfig, output: str, storage: Storage, params: dict[str, Any]
    ) -> None:
        self.errors: list[tuple[str, str]] = []
        state_uri = join(output, TRACKING_STATE)
        state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {}
        run_name = config.run_name or Path(output.rstrip("/")).name
        opened: dict[str, Any] = {}
        if config.tensorboard:
            opened["tensorboard"] = lambda: TensorBoardTracker(output, storage)
        if config.mlflow:
            opened["mlflow"] = lambda: MlflowTracker(
                config, run_name, params, state.get("mlflow_run_id")
            )
        if config.wandb:
            opened["wandb"] = lambda: WandbTracker(
                config, output, run_name, params, state.get("wandb_run_id")
            )
        self.trackers: dict[str, Tracker] = {}
        for name, open_tracker in opened.items():
            try:
                self.trackers[name] = open_tracker()
            except Exception as error:  # noqa: BLE001 - reported, not raised
                self.errors.append((name, f"{type(error).__name__}: {error}"))
        ids = {
            f"{name}_run_id": t.run_id for name, t in self.trackers.items() if hasattr(t, "run_id")
        }
        if ids and ids.items() - state.items():
            storage.write_bytes(state_uri, json.dumps(state | ids).encode())

    def _call(self, name: str, call: Any) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - any tracker failure is reported, not raised
            self.trackers.pop(name, None)
            self.errors.append((name, f"{type(error).__name__}: {error}"))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for name, tracker in list(self.trackers.items()):
            self._call(name, lambda tracker=tracker: tracker.log(step, scalars))

    def image(self, step: int, tag: str, png: bytes) -> None:
        for name, tracker in list(self.trackers.items()):
            self._call(name, lambda tracker=tracker: tracker.image(step, tag, png))

    def flush(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._call(name, tracker.flush)

    def close(self) -> None:
        for name, tracker in list(self.trackers.items()):
            self._call(name, tracker.close)
        self.trackers = {}

    def take_errors(self) -> list[tuple[str, str]]:
        errors, self.errors = self.errors, []
        return errors


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
