"""Each round's numbers in TensorBoard's event files, for people who already watch jobs there.

Off unless the job says `report.tensorboard = true` (`fedtune-sim --tensorboard on`). It exports the
metrics dict the run folder's `live.json` and `metrics.json` are written from (server/report.py
`build_metrics`), so TensorBoard shows the numbers the reports show and nothing the institutions
did not already report. Events go to the run folder's `tensorboard/` (`tensorboard --logdir RUN`).
"""

from __future__ import annotations

from pathlib import Path

from server.run_folder import TENSORBOARD_DIR


class TensorBoardExport:
    """Writes every round of a metrics dict once, in round order, as scalars at step = round."""

    def __init__(self, run_folder: Path):
        from torch.utils.tensorboard import SummaryWriter  # tensorboard: only for jobs that ask for it

        self.writer = SummaryWriter(log_dir=str(Path(run_folder) / TENSORBOARD_DIR))
        self.written: set[int] = set()

    def update(self, metrics: dict) -> None:
        spent = {inst["name"]: inst.get("dataset_epsilon_per_round", {}) for inst in metrics["institutions"]}
        budgets = {inst["name"]: inst.get("budget_epsilon") for inst in metrics["institutions"]}
        for row in metrics["rounds"]:
            step = int(row["round"])
            if step in self.written:
                continue
            for key in ("accuracy", "loss"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"global/{key}", row[key], step)
            self.writer.add_scalar("bytes/down", row["bytes_down"], step)
            self.writer.add_scalar("bytes/up", row["bytes_up"], step)
            for name, epsilon in row["epsilon"].items():
                self.writer.add_scalar(f"job_epsilon/{name}", epsilon, step)
            for name, per_round in spent.items():
                if str(step) in per_round:
                    self.writer.add_scalar(f"dataset_epsilon/{name}", per_round[str(step)], step)
                    if budgets.get(name) is not None:
                        self.writer.add_scalar(f"budget_left/{name}", budgets[name] - per_round[str(step)], step)
            self.writer.add_scalar("institutions/declined", len(row["declined"]), step)
            self.writer.add_scalar("institutions/dropped", len(row["dropped"]), step)
            self.written.add(step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
