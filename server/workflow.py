"""Flower's default workflow with a first round and an end-of-round hook, so a job can resume.

Flower 1.39's `DefaultWorkflow` always runs rounds 1..num_rounds from the strategy's initial
parameters and has no hook after a round. This one runs the same fit workflow (plain or SecAgg+)
and central evaluation, from `first_round` on with the weights it is given, and calls
`after_round(round)` once a round is complete (aggregated and evaluated): the ServerApp writes its
checkpoint there (server/checkpoint.py).
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from logging import INFO

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import NDArrays, ndarrays_to_parameters
from flwr.common.logger import log
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_centralized_evaluation_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import Grid


class ResumableWorkflow(DefaultWorkflow):
    def __init__(self, workflow: DefaultWorkflow, first_round: int = 1, weights: ArrayRecord | None = None,
                 after_round: Callable[[int], None] = lambda server_round: None):
        """`weights`: the global weights after round `first_round - 1` (None: a fresh job, the strategy's)."""
        super().__init__(fit_workflow=workflow.fit_workflow, evaluate_workflow=workflow.evaluate_workflow)
        self.first_round, self.weights, self.after_round = first_round, weights, after_round

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        registered.wait()
        try:
            if self.weights is None:
                default_init_params_workflow(grid, context)  # the initial weights, evaluated as round 0
            else:
                context.state.array_records[MAIN_PARAMS_RECORD] = self.weights
                log(INFO, "[RESUME] from the checkpoint of round %s", self.first_round - 1)
            config = ConfigRecord()
            config[Key.START_TIME] = timeit.default_timer()
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            for current_round in range(self.first_round, context.config.num_rounds + 1):
                log(INFO, "")
                log(INFO, "[ROUND %s]", current_round)
                config[Key.CURRENT_ROUND] = current_round
                self.fit_workflow(grid, context)
                default_centralized_evaluation_workflow(grid, context)
                self.evaluate_workflow(grid, context)
                self.after_round(current_round)
        finally:
            stop.set()
            thread.join()


def weights_record(weights: NDArrays) -> ArrayRecord:
    """NumPy arrays as the workflow keeps the global weights."""
    return compat.parameters_to_arrayrecord(ndarrays_to_parameters(weights), keep_input=True)
