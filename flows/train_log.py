"""What the Ray Train controller runs for a raygen run: rank 0's metrics as progress lines on
the driver's console, ``metrics.jsonl`` and ``loss.png``.

Its own module, without torch or diffusers: Ray Train unpickles the run's callbacks in its
controller process, which would otherwise import the whole training flow (seconds of a
core) before the workers start.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from ray.train.v2.api.callback import UserCallback

from cluster.ray_runtime import DriverConsole
from cluster.storage import Storage, join
from flows.tracking import Trackers, scalars_of
from schemas.config import TrackingConfig

EVAL_CATEGORIES = ("color", "shape", "place", "all")  # train's eval_every scores


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def smoothed(values: list[float]) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start; its
    weight grows with the number of points (20 or fewer: none; 50: 0.6; 100 and more: 0.8),
    so that a short curve is not dragged behind its points."""
    weight = float(np.clip(1 - 20 / max(len(values), 1), 0.0, 0.8))
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return np.asarray(out)


def metrics_png(history: list[dict[str, Any]], title: str = "") -> bytes:
    """The loss against step (raw and smoothed, log scale), and beside it the held-out
    prompt-following scores where the run measured them, drawn with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a Ray node
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scored = [r for r in history if "eval_all" in r]
    figure = Figure(figsize=(10.0 if scored else 6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2 if scored else 1, squeeze=False)[0]
    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    axes[0].plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    axes[0].plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="smoothed")
    # A log scale where the loss falls by a decade or more; a narrow range reads better linear.
    positive = [v for v in losses if v > 0]
    wide = bool(positive) and max(positive) / min(positive) >= 10
    axes[0].set(xlabel="step", ylabel="loss", yscale="log" if wide else "linear")
    axes[0].set_title(title or "training loss")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="upper right")
    if scored:
        # Categories often coincide (all at 1.0): markers of different sizes keep each seen.
        styles = {
            "color": {"marker": "o", "markersize": 9},
            "shape": {"marker": "s", "markersize": 6},
            "place": {"marker": "^", "markersize": 4},
            "all": {"color": "black", "linestyle": "--", "linewidth": 2},
        }
        for category in EVAL_CATEGORIES:
            axes[1].plot(
                [r["step"] for r in scored],
                [r[f"eval_{category}"] for r in scored],
                label=category,
                **styles[category],
            )
        axes[1].set(xlabel="step", ylabel="accuracy", ylim=(-0.04, 1.06))
        axes[1].set_title("held-out prompts")
        axes[1].grid(True, alpha=0.3)
        axes[1].legend(loc="best")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class MetricsLog(UserCallback):
    """On the Train controller: rank 0's metrics -> progress lines, metrics.jsonl, loss.png,
    and the trackers of ``tracking`` (TensorBoard by default; MLflow, W&B)."""

    def __init__(
        self,
        output: str,
        storage: Storage,
        total_steps: int,
        history: list[dict],
        console: DriverConsole,
        tracking: TrackingConfig | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.output, self.storage, self.total_steps = output, storage, total_steps
        self.history, self.console = history, console
        self.tracking, self.params = tracking or TrackingConfig(tensorboard=False), params or {}
        self.trackers: Trackers | None = None  # opened at the first report, on the controller

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        records = metrics[0]["records"]
        if not records:
            return
        # A restarted worker group repeats steps after its checkpoint: keep the newest.
        first = records[0]["step"]
        self.history = [r for r in self.history if r["step"] < first] + records
        for resumed in records:
            if "resumed_from_step" in resumed:
                self.console.say(
                    f"[raygen] resumed from the checkpoint of step {resumed['resumed_from_step']}"
                )
        record = records[-1]
        self.console.say(
            f"[raygen] step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
            f"grad_norm {record['grad_norm']:.3f} lr {record['lr']:.2e} "
            f"{record['samples_per_s']:.1f} samples/s data_wait {record['data_wait_fraction']:.1%}"
            + (" [checkpoint]" if checkpoint else "")
        )
        for scored in records:
            if "eval_all" in scored:
                self.console.say(
                    f"[raygen] step {scored['step']} held-out prompts: "
                    + ", ".join(f"{c} {scored[f'eval_{c}']:.2f}" for c in EVAL_CATEGORIES)
                )
        lines = "".join(json.dumps(r) + "\n" for r in self.history)
        self.storage.write_bytes(join(self.output, "metrics.jsonl"), lines.encode())
        last = record["step"] == self.total_steps
        self._track(records, flush=bool(checkpoint) or last, close=last)
        if checkpoint or last:
            png = metrics_png(self.history, title=f"{Path(self.output.rstrip('/')).name} loss")
            self.storage.write_bytes(join(self.output, "loss.png"), png)

    def _track(self, records: list[dict[str, Any]], flush: bool, close: bool) -> None:
        """The records to the trackers. A tracker that fails (a tracking server down) is
        named on the console and dropped: it must not stop a training run."""
        if self.trackers is None:
            self.trackers = Trackers(self.tracking, self.output, self.storage, self.params)
        for record in records:
            self.trackers.log(record["step"], scalars_of(record))
            if "sample" in record:
                png = self.storage.read_bytes(join(self.output, record["sample"]))
                self.trackers.image(record["step"], "samples", png)
        if flush:
            self.trackers.flush()
        if close:
            self.trackers.close()
        for name, error in self.trackers.take_errors():
            self.console.say(f"[raygen] {name} tracking failed, not used from here: {error}")

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        # Worker output stays in Ray's logs: say here that workers failed (Ray Train restarts
        # them from the last checkpoint while failures are left; the last one is raised).
        for rank, error in sorted(worker_exceptions.items()):
            # A worker's error text is its traceback; the last line names the exception.
            summary = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            self.console.say(f"[raygen] worker rank {rank} failed: {summary}")
