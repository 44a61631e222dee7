"""fedtune's live console: a local web page that follows jobs while they run.

`fedtune-server console` follows a coordinator's jobs, `fedtune-sim --console` the one job it
simulates. Read-only: it reads the run folders, the coordinator's runs.json and Flower's own
record of runs and nodes, and never asks an institution for anything. Served on 127.0.0.1 only,
behind a random token carried in the URL; see `web.py`. Not part of the app bundle institutions
approve (`fab-include` takes only `server/*.py`): the ServerApp does not import it.
"""

from server.console.state import CoordinatorJobs, SimulatedJob
from server.console.web import Console, ConsoleServer

__all__ = ["Console", "ConsoleServer", "CoordinatorJobs", "SimulatedJob"]


def serve_simulation(folder, job, port: int = 0) -> tuple[SimulatedJob, ConsoleServer]:
    """Start a console in a background thread for the one job (a JobConfig) a simulation runs into `folder`."""
    import json

    watched = SimulatedJob(folder, status="running", config=json.loads(job.to_json()))
    return watched, ConsoleServer(Console(watched.snapshot), port).start()
