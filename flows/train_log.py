"""What the Ray Train controller runs for a raygen run: rank 0's metrics as progress lines on
the driver's console, ``metrics.jsonl`` and ``loss.png``.

Its own module, without torch or diffusers: Ray Train unpickles the run's callbacks in its
controller process, which would otherwise import the whole training flow (seconds of a
core) before the workers start.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from ray.train.v2.api.callback import UserCallback

from cluster.ray_runtime import DriverConsole
from cluster.storage import Storage, join

EVAL_CATEGORIES = ("color", "shape", "place", "all")  # train's eval_every scores


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def loss_curve_png(
    steps: list[int], losses: list[float], size: tuple[int, int] = (640, 360)
) -> bytes:
    """A plain line plot of loss against step (log scale), drawn with PIL."""
    width, height = size
    pad = 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([pad, pad // 2, width - pad // 2, height - pad], outline="black")
    if len(steps) >= 1:
        logs = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
        lo, hi = float(logs.min()), float(logs.max())
        hi = hi if hi > lo else lo + 1.0
        x0, x1 = steps[0], max(steps[-1], steps[0] + 1)
        points = [
            (
                pad + (s - x0) / (x1 - x0) * (width - 1.5 * pad),
                height - pad - (v - lo) / (hi - lo) * (height - 1.5 * pad),
            )
            for s, v in zip(steps, logs, strict=True)
        ]
        draw.line(points, fill="steelblue", width=2)
        draw.text((pad, height - pad + 8), f"step {x0}", fill="black")
        draw.text((width - 3 * pad, height - pad + 8), f"step {x1}", fill="black")
        draw.text((4, pad // 2), f"{10**hi:.3g}", fill="black")
        draw.text((4, height - pad - 10), f"{10**lo:.3g}", fill="black")
    draw.text((width // 2 - 20, 4), "loss", fill="black")
    return png_bytes(image)


class MetricsLog(UserCallback):
    """On the Train controller: rank 0's metrics -> progress lines, metrics.jsonl, loss.png."""

    def __init__(
        self,
        output: str,
        storage: Storage,
        total_steps: int,
        history: list[dict],
        console: DriverConsole,
    ) -> None:
        self.output, self.storage, self.total_steps = output, storage, total_steps
        self.history, self.console = history, console

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
        if checkpoint or record["step"] == self.total_steps:
            curve = loss_curve_png(
                [r["step"] for r in self.history], [r["loss"] for r in self.history]
            )
            self.storage.write_bytes(join(self.output, "loss.png"), curve)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        # Worker output stays in Ray's logs: say here that workers failed (Ray Train restarts
        # them from the last checkpoint while failures are left; the last one is raised).
        for rank, error in sorted(worker_exceptions.items()):
            # A worker's error text is its traceback; the last line names the exception.
            summary = (str(error).strip().splitlines() or [type(error).__name__])[-1]
            self.console.say(f"[raygen] worker rank {rank} failed: {summary}")
