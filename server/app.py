"""The coordinator's ServerApp: runs the federated rounds and writes the run folder.

The coordinator never sees a training record. It holds the public test split, evaluates each
round's global model on it, and writes metrics, report, plots and the final model to the
run folder (run-config key `out-dir`, default `runs/<timestamp>`).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from logging import WARNING
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import NDArrays, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from common.config import NAMES_KEY, OUT_DIR_KEY, RUN_CONFIG_KEY, JobConfig
from common.data import read_records
from common.model import (
    UpperStack,
    build_model,
    count_parameters,
    default_cache_dir,
    encode,
    evaluate,
    from_ndarrays,
    load_trainable_state,
    model_path,
    pick_device,
    save_model,
    to_ndarrays,
    trainable_state,
)
from server.report import build_metrics, write_json_atomic, write_report
from server.round_log import RecordingGrid, RoundLog
from server.run_folder import LIVE_FILE
from server.strategy import ClippedUpdatesOnly, make_strategy, make_workflow

app = ServerApp()


def run_folder(context: Context) -> Path:
    configured = str(context.run_config.get(OUT_DIR_KEY, "") or "")
    return Path(configured or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


class CentralEvaluation:
    """Evaluates each round's global weights on the coordinator's held-out test file."""

    def __init__(self, job: JobConfig, model):
        self.model = model
        self.names = list(trainable_state(model))
        self.upper = UpperStack(model, job.model)
        test = read_records(job.data.test_path, job.data.text_column, job.data.label_column)
        self.labels = torch.tensor(test.label_ids(job.data.labels))
        self.features = encode(model, job.model, test.texts, default_cache_dir())
        self.results: dict[int, dict] = {}
        self.started = time.perf_counter()
        self.after_round = lambda: None  # main() sets it: the run folder's live.json

    def __call__(self, server_round: int, weights: NDArrays, config: dict) -> tuple[float, dict]:
        load_trainable_state(self.model, from_ndarrays(self.names, weights))
        result = evaluate(self.upper, self.features, self.labels)
        self.results[server_round] = dict(result, seconds=round(time.perf_counter() - self.started, 2))
        self.after_round()
        return result["loss"], result


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
    if job.data.labels is None or job.data.test_path is None:
        raise ValueError("the job must list data.labels and data.test_path before it reaches the coordinator")
    out = run_folder(context)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(job.model, job.data.labels, pick_device(job.training.device), seed=job.federation.seed)
    evaluation = CentralEvaluation(job, model)
    round_log = RoundLog(node_names={int(node): name for node, name in json.loads(
        str(context.run_config.get(NAMES_KEY, "{}"))).items()})
    strategy = make_strategy(job, ndarrays_to_parameters(to_ndarrays(trainable_state(model))), evaluation, round_log)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=job.federation.rounds), strategy=strategy)

    def write_live() -> None:
        """After each round's evaluation: the metrics so far, for the console (server/console)."""
        noised = strategy.noised_rounds if isinstance(strategy, ClippedUpdatesOnly) else 0
        try:
            write_json_atomic(out / LIVE_FILE, build_metrics(job, evaluation.results, round_log, {
                "wall_seconds": round(time.perf_counter() - started, 2), "institution_dp_rounds": noised}))
        except Exception as exc:  # noqa: BLE001 - the console's view never stops the job
            log(WARNING, "could not write %s: %s", out / LIVE_FILE, exc)

    evaluation.after_round = write_live
    make_workflow(job)(RecordingGrid(grid, round_log, job.federation.round_timeout), legacy)
    # The workflow keeps the global weights in the context; unchanged when every round was declined.
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    load_trainable_state(model, from_ndarrays(evaluation.names, final))
    save_model(model, job.data.labels, out / "model")
    trainable, total = count_parameters(model)
    extra = {
        "model_path": model_path(job.model),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "institution_dp_rounds": strategy.noised_rounds if isinstance(strategy, ClippedUpdatesOnly) else 0,
    }
    metrics = build_metrics(job, evaluation.results, round_log, extra)
    write_report(out, metrics)
