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

import numpy as np
import torch
from flwr.app import Context
from flwr.common import NDArrays, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from common.config import JOB_ID_KEY, NAMES_KEY, OUT_DIR_KEY, RUN_CONFIG_KEY, JobConfig, new_job_id
from common.data import read_job_records
from common.model_files import default_cache_dir
from common.models.device import pick_device
from common.models.export import save_model
from common.models.kinds import model_kind
from common.models.loading import model_path
from common.models.transport import count_parameters, from_ndarrays, load_trainable_state, to_ndarrays, trainable_state
from server import checkpoint
from server.report import build_metrics, write_json_atomic, write_privacy_report, write_report
from server.polling import waiting_grid
from server.round_log import RecordingGrid, RoundLog
from server.run_folder import LIVE_FILE
from server.strategy import (
    ClippedUpdatesOnly,
    LeastAskedFirst,
    load_state_dict,
    make_strategy,
    make_workflow,
    state_dict,
)
from server.workflow import ResumableWorkflow, weights_record
from server.tracking import TensorBoardExport
from server.update_checks import AGGREGATE

app = ServerApp()


def run_folder(context: Context) -> Path:
    configured = str(context.run_config.get(OUT_DIR_KEY, "") or "")
    return Path(configured or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


class CentralEvaluation:
    """Evaluates each round's global weights on the coordinator's held-out test file."""

    def __init__(self, job: JobConfig, model):
        self.model = model
        self.names = list(trainable_state(model))
        self.kind = model_kind(job.model)
        self.upper = self.kind.UpperStack(model, job.model)
        self.test = read_job_records(job.data.test_path, job.data)
        self.label_set = job.data.labels
        self.labels = torch.tensor(self.test.label_ids(job.data.labels) if job.data.labels else [0] * len(self.test))
        self.features = self.kind.encode(model, job.model, self.test, default_cache_dir())
        self.results: dict[int, dict] = {}
        self.started = time.perf_counter()
        self.after_round = lambda: None  # main() sets it: the run folder's live.json

    def __call__(self, server_round: int, weights: NDArrays, config: dict) -> tuple[float, dict]:
        load_trainable_state(self.model, from_ndarrays(self.names, weights))
        result = self.kind.evaluate(self.upper, self.features, self.labels, self.test, self.label_set)
        self.results[server_round] = dict(result, seconds=round(time.perf_counter() - self.started, 2))
        self.after_round()
        return result["loss"], result


class JournaledGrid(RecordingGrid):
    """Writes who each exchange asks before sending it (server/checkpoint.py `write_in_flight`)."""

    def __init__(self, grid: Grid, round_log: RoundLog, timeout: float, run_folder: Path):
        super().__init__(grid, round_log, timeout)
        self.run_folder = run_folder

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages:
            checkpoint.write_in_flight(self.run_folder, int(messages[0].metadata.group_id),
                                       [self.round_log.name_of(msg.metadata.dst_node_id) for msg in messages])
        return super().send_and_receive(messages, timeout=timeout)


@app.main()
def main(grid: Grid, context: Context) -> None:
    job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
    if job.data.labels is None or job.data.test_path is None:
        raise ValueError("the job must list data.labels and data.test_path before it reaches the coordinator")
    job_id = str(context.run_config.get(JOB_ID_KEY, "") or new_job_id())
    out = run_folder(context)
    out.mkdir(parents=True, exist_ok=True)
    # A job resumes from its run folder's newest checkpoint that verifies (server/checkpoint.py).
    resumed = checkpoint.latest(out)
    if resumed is not None and (resumed.job_id != job_id or resumed.job_json != job.to_json()):
        raise ValueError(f"{out}: its checkpoint is of job {resumed.job_id} with another config; not resuming")
    done = resumed.server_round if resumed else 0
    sessions = checkpoint.claim_run_folder(out, job_id, job.to_json(), {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"), "run_id": str(context.run_id),
        "after_round": done, "asked": checkpoint.asked_in_flight(out, done + 1)})
    started = time.perf_counter() - (resumed.wall_seconds if resumed else 0.0)
    model = model_kind(job.model).build_model(job.model, job.data.labels, pick_device(job.training.device),
                                              seed=job.federation.seed)
    evaluation = CentralEvaluation(job, model)
    evaluation.started = started
    round_log = checkpoint.round_log_from_dict(resumed.round_log) if resumed else RoundLog()
    admitted = {int(node): name for node, name in json.loads(str(context.run_config.get(NAMES_KEY, "{}"))).items()}
    round_log.node_names.update(admitted)
    deployed = bool(admitted)  # `fedtune-server submit` names the admitted institutions; a simulation does not
    if resumed:
        load_trainable_state(model, from_ndarrays(evaluation.names, resumed.weights))
        evaluation.results = dict(resumed.evaluations)
    strategy = make_strategy(job, ndarrays_to_parameters(to_ndarrays(trainable_state(model))), evaluation, round_log)
    clients = LeastAskedFirst()
    if resumed:
        load_state_dict(strategy, resumed.strategy, clients)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=job.federation.rounds), strategy=strategy,
                           client_manager=clients)

    def noised_rounds() -> int:
        return strategy.noised_rounds if isinstance(strategy, ClippedUpdatesOnly) else 0

    def so_far() -> dict:
        return build_metrics(job, evaluation.results, round_log, {
            "job_id": job_id, "sessions": sessions, "voided_rounds": voided, "deployed": deployed,
            "wall_seconds": round(time.perf_counter() - started, 2), "institution_dp_rounds": noised_rounds()})

    previous = resumed.weights if resumed else to_ndarrays(trainable_state(model))
    voided = list(resumed.voided_rounds) if resumed else []

    def after_round(server_round: int) -> None:
        """A completed round: its checkpoint, then the privacy report so far (a crash leaves what was spent)."""
        nonlocal previous
        weights = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        # Institutions released updates, no check rejected the sum, yet the model did not move: SecAgg+
        # halted (too few survivors of a dropout to unmask), or the strategy aggregated nothing.
        if (round_log.replies.get(server_round) and AGGREGATE not in round_log.rejected.get(server_round, {})
                and all(np.array_equal(a, b) for a, b in zip(weights, previous))):
            voided.append(server_round)
        previous = weights
        checkpoint.save(out, checkpoint.Checkpoint(
            job_id=job_id, server_round=server_round, job_json=job.to_json(),
            weights=weights, strategy=state_dict(strategy, clients),
            round_log=checkpoint.round_log_to_dict(round_log), evaluations=evaluation.results,
            wall_seconds=time.perf_counter() - started, sessions=sessions, voided_rounds=voided))
        try:
            write_privacy_report(out, so_far())
        except Exception as exc:  # noqa: BLE001 - the checkpoint is written; the report is rewritten next round
            log(WARNING, "could not write the privacy report in %s: %s", out, exc)

    tensorboard = TensorBoardExport(out) if job.report.tensorboard else None

    def write_live() -> None:
        """After each round's evaluation: the metrics so far, for the console (server/console) and TensorBoard."""
        try:
            metrics = so_far()
            write_json_atomic(out / LIVE_FILE, metrics)
            if tensorboard is not None:
                tensorboard.update(metrics)
        except Exception as exc:  # noqa: BLE001 - the live views never stop the job
            log(WARNING, "could not update live.json or TensorBoard in %s: %s", out, exc)

    evaluation.after_round = write_live
    workflow = ResumableWorkflow(make_workflow(job), first_round=done + 1, after_round=after_round,
                                 weights=weights_record(resumed.weights) if resumed else None)
    workflow(JournaledGrid(waiting_grid(grid, job.federation.pace), round_log, job.federation.round_timeout, out),
             legacy)
    # The workflow keeps the global weights in the context; unchanged when every round was declined.
    final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    load_trainable_state(model, from_ndarrays(evaluation.names, final))
    save_model(model, job.model, job.data.labels, out / "model")
    trainable, total = count_parameters(model)
    extra = {
        "job_id": job_id,
        "sessions": sessions,
        "voided_rounds": voided,
        "deployed": deployed,
        "model_path": model_path(job.model),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "institution_dp_rounds": noised_rounds(),
        "samples": evaluation.kind.samples(model, job.model, evaluation.test, job.report.samples, job.data.labels),
    }
    metrics = build_metrics(job, evaluation.results, round_log, extra)
    if tensorboard is not None:
        tensorboard.update(metrics)
        tensorboard.close()
    write_report(out, metrics)
