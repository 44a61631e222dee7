"""Runs a job on Flower's simulation engine (Ray): N institutions on one machine.

The ServerApp and ClientApp are the production ones; only the transport differs. Flower's
public `run_simulation` drops the run config, which is how the job reaches both apps, so this
calls the engine's `_run_simulation` (flwr pinned to 1.39.0) with the run config attached.
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from client.app import app as institution_app
from client.round import STATE_DIR_ENV
from common.config import OUT_DIR_KEY, REPO_ROOT, RUN_CONFIG_KEY, JobConfig
from common.flower_env import quiet_flower
from server.app import app as coordinator_app


def _new_run(run_config: dict) -> Run:
    """A run carrying our run config, set up the way `_run_simulation` sets up its own."""
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    return run


class SimulationFailed(RuntimeError):
    """The simulated job did not finish; the message carries the first error seen."""


def simulate(
    job: JobConfig,
    out: Path,
    state_dir: Path,
    cpus_per_institution: float = 1.0,
    gpus_per_institution: float = 0.0,
    verbose: bool = False,
    server_app: ServerApp = coordinator_app,
    client_app: ClientApp = institution_app,
) -> None:
    """Run `job` with `job.federation.institutions` simulated institutions; results go to `out`,
    institution `name`'s privacy ledger to `state_dir/name`. Other apps: tests that observe the real ones."""
    if not verbose:
        quiet_flower()
    os.environ[STATE_DIR_ENV] = str(state_dir)
    run_config = {RUN_CONFIG_KEY: job.to_json(), OUT_DIR_KEY: str(out)}
    run = _new_run(run_config)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_institution, "num_gpus": gpus_per_institution},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False},
    }
    result = _run_simulation(
        num_supernodes=job.federation.institutions,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app,
        server_app=server_app,
        backend_config=backend_config,
        server_app_context=context,
        app_dir=str(REPO_ROOT),  # with is_app, clients read the run config from here + overrides
        run=run,
        is_app=True,
    )
    if not (out / "metrics.json").is_file():
        raise SimulationFailed(f"the simulation ended without results ({result!r}); see the log above")
