"""The trackers a run's metrics go to (flows/tracking.py), without Ray: TensorBoard's view of
repeated steps, a tracker that fails being dropped while the others go on, and the loss plot.
The Ray Train runs that use them are in test_train.py."""

import io

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cluster.storage import Storage
from flows.tracking import Trackers, scalars_of
from flows.train_log import metrics_png
from schemas.config import TrackingConfig


def _scalars(folder) -> dict[str, dict[int, float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_failing_tracker_is_dropped_and_named_while_tensorboard_goes_on(tmp_path):
    # MLflow cannot write its store there: the error is kept, not raised.
    config = TrackingConfig(mlflow="file:/proc/raygen-mlruns")
    trackers = Trackers(config, str(tmp_path / "run"), Storage(), {"max_steps": 3})
    [(name, error)] = trackers.take_errors()
    assert name == "mlflow" and "/proc/raygen-mlruns" in error
    for step in (1, 2, 3):
        trackers.log(step, {"loss": 1.0 / step, "eval_color": 0.5})
    # A restarted worker group repeats steps 2 and 3: TensorBoard shows the new values.
    for step in (2, 3):
        trackers.log(step, {"loss": 0.1, "eval_color": 1.0})
    trackers.close()
    assert trackers.take_errors() == []
    shown = _scalars(tmp_path / "run" / "tensorboard")
    assert shown["train/loss"] == pytest.approx({1: 1.0, 2: 0.1, 3: 0.1})
    assert shown["eval/color"] == {1: 0.5, 2: 1.0, 3: 1.0}


def test_scalars_are_a_records_numbers():
    record = {"step": 3, "epoch": 0, "time": 1.0, "loss": 0.5, "sample": "samples/x.png"}
    assert scalars_of(record | {"resumed_from_step": 2, "lr": 1e-3}) == {"loss": 0.5, "lr": 1e-3}


def test_the_loss_plot_has_the_held_out_scores_beside_it_when_measured():
    history = [{"step": s, "loss": 2.0 / s} for s in range(1, 41)]
    assert Image.open(io.BytesIO(metrics_png(history))).size == (640, 360)
    for record in history[9::10]:
        record.update(eval_color=0.5, eval_shape=0.25, eval_place=1.0, eval_all=0.25)
    assert Image.open(io.BytesIO(metrics_png(history))).size == (1000, 360)
