"""TensorBoard export (report.tensorboard): the event files hold the numbers metrics.json holds, once per round."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.config import JobConfig
from server.run_folder import TENSORBOARD_DIR
from server.tracking import TensorBoardExport


def scalars(run_folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a run folder's event files, read back with TensorBoard's own reader."""
    events = EventAccumulator(str(run_folder / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def metrics_of(rounds: int) -> dict:
    return {
        "rounds": [{"round": r, "accuracy": 0.1 * r, "loss": 3.0 - r, "bytes_down": 1000 * r, "bytes_up": 10 * r,
                    "epsilon": {"st-mary": 0.5 * r}, "declined": {}, "dropped": {"st-john": "went offline"}}
                   for r in range(rounds + 1)],
        "institutions": [{"name": "st-mary", "budget_epsilon": 10.0,
                          "dataset_epsilon_per_round": {str(r): 1.0 + 0.5 * r for r in range(1, rounds + 1)}}],
    }


def test_tensorboard_is_off_by_default():
    assert JobConfig().report.tensorboard is False


def test_each_round_is_written_once_however_often_the_metrics_are_exported(tmp_path):
    export = TensorBoardExport(tmp_path)
    for rounds in (0, 1, 2, 2):  # live updates after each round, then the final metrics again
        export.update(metrics_of(rounds))
    export.close()
    found = scalars(tmp_path)
    assert [s for s, _ in found["global/accuracy"]] == [0, 1, 2]
    assert [v for _, v in found["global/accuracy"]] == pytest.approx([0.0, 0.1, 0.2])  # float32 in the file
    assert [s for s, _ in found["global/loss"]] == [0, 1, 2]
    assert found["bytes/down"] == [(0, 0.0), (1, 1000.0), (2, 2000.0)]
    assert found["dataset_epsilon/st-mary"] == [(1, 1.5), (2, 2.0)]
    assert found["budget_left/st-mary"] == [(1, 8.5), (2, 8.0)]
    assert found["job_epsilon/st-mary"] == [(0, 0.0), (1, 0.5), (2, 1.0)]
    assert found["institutions/dropped"] == [(0, 1.0), (1, 1.0), (2, 1.0)]
