"""Runs a job on Flower's simulation engine (Ray): N institutions on one machine.

The ServerApp and ClientApp are the production ones; only the transport differs. Flower's
public `run_simulation` drops the run config, which is how the job reaches both apps, so this
calls the engine's `_run_simulation` (flwr pinned to 1.39.0) with the run config attached.

Ray listens on loopback only, and answers only this simulation's processes. By default it
advertises the machine's outward address and binds its GCS, raylet, object manager and worker
ports to every interface, even when asked for `_node_ip_address="127.0.0.1"` (Ray turns that
into the outward address); its single-machine mode, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the
default on macOS and Windows), uses 127.0.0.1 for all of them. Loopback is still open to every
other user of the machine, and whoever joins a Ray cluster runs code as its user; Ray's token
authentication (`RAY_AUTH_MODE=token`, a fresh random token per process, in the environment only,
which other users cannot read) shuts them out. Both must be set before Ray is imported, in this
process and so in every Ray process it starts.

Memory is flat in the number of institutions: Flower's Ray backend starts cores /
`cpus_per_institution` actors, whatever N, and hands each institution's message to a free one; an
actor keeps a few institutions' models and features (client/round.py), a simulated institution
between rounds is only its Flower context and its ledger on disk (BENCHMARKS.md, "A federation
of 100").
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before flwr imports Ray: see above
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

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
from common.config import JOB_ID_KEY, OUT_DIR_KEY, REPO_ROOT, RUN_CONFIG_KEY, JobConfig, new_job_id
from common.flower_env import quiet_flower
from server.app import app as coordinator_app
from simulations.budgets import register_budgets


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
    budget_epsilon: float | None = None,
    budget_delta: float | None = None,
    server_app: ServerApp = coordinator_app,
    client_app: ClientApp = institution_app,
    job_id: str | None = None,
) -> None:
    """Run `job` with `job.federation.institutions` simulated institutions; results go to `out`,
    institution `name`'s privacy ledger to `state_dir/name`, with its budget registered first
    (simulations/budgets.py). Other apps: tests that observe the real ones. `job_id`: the id of a job
    to resume from its run folder's checkpoint (default: a new job)."""
    if not verbose:
        quiet_flower()
    register_budgets(job, state_dir, budget_epsilon, budget_delta)
    os.environ[STATE_DIR_ENV] = str(state_dir)
    run_config = {RUN_CONFIG_KEY: job.to_json(), OUT_DIR_KEY: str(out), JOB_ID_KEY: job_id or new_job_id()}
    run = _new_run(run_config)
    from ray._private import ray_constants  # pylint: disable=import-outside-toplevel

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case Ray was imported before this module set the variable
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_institution, "num_gpus": gpus_per_institution},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "log_to_driver": False,
                      "_node_ip_address": "127.0.0.1"},
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
