"""What the console shows, read from what the coordinator already writes: nothing is asked of anyone.

A job's numbers come from its run folder: `metrics.json` and `privacy.json` once the job has ended,
`live.json` (the same shape, rewritten by the ServerApp after every round's evaluation) while it
runs, and, in a simulation, the institutions' step events in `progress.jsonl`. Its status comes
from whoever runs it: the simulation itself, or Flower's own record of the run (`flwr ls`) on a
coordinator, whose `runs.json` says which run folder belongs to which run; the faults its Fleet port
turned away come from its SuperLink's `fleet-events.jsonl` (server/fleet_events.py). Pure functions
of those files, so they test without a browser or a network.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from server import fleet_events
from server.run_folder import LIVE_FILE, METRICS_FILE, PRIVACY_FILE, PROGRESS_FILE

# Flower's run statuses, as the console names them.
RUNNING, FINISHED, FAILED, INTERRUPTED, PENDING, UNKNOWN = (
    "running", "finished", "failed", "interrupted", "pending", "unknown")
FLOWER_STATUS = {
    "finished:completed": FINISHED,
    "finished:failed": FAILED,
    "finished:stopped": INTERRUPTED,
    "running": RUNNING,
    "starting": PENDING,
    "pending": PENDING,
}
ENDED = {FINISHED, FAILED, INTERRUPTED}

# An epsilon above its budget by less than this is Opacus' search tolerance, not an overrun.
BUDGET_TOLERANCE = 1e-3


def _read_json(path: Path) -> dict | None:
    """A JSON file written atomically by its owner; None while it does not exist (or is not JSON yet)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _describe(details: str) -> str:
    """Flower's reason a run failed, with an institution's refusal as its sentence."""
    try:
        from common.messages import describe_error
    except ImportError:
        return details
    return describe_error(details)


@lru_cache(maxsize=512)
def _epsilon(noise: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    from common.accounting import epsilon  # Opacus: imported only when a projection is needed

    return epsilon([(noise, rate, steps)], delta, accountant)


def projected_epsilon(inst: dict, rounds_left: int) -> float | None:
    """The data set's epsilon after `rounds_left` more rounds of this job at its current mechanism.

    The job's own history is one mechanism (noise and sampling are planned once per job), so its
    epsilon after the planned rounds is the accountant's value for all its steps; what earlier jobs
    spent on the data set is carried as the difference between the data set's and the job's epsilon
    (an upper bound: composition is never worse than additive).
    """
    needed = ("noise_multiplier", "sample_rate", "steps", "delta", "accountant", "epsilon", "dataset_epsilon")
    if any(inst.get(key) is None for key in needed) or not inst.get("rounds"):
        return None
    if rounds_left <= 0:
        return float(inst["dataset_epsilon"])
    per_round = math.ceil(inst["steps"] / inst["rounds"])
    try:
        job_at_end = _epsilon(float(inst["noise_multiplier"]), float(inst["sample_rate"]),
                              int(inst["steps"]) + per_round * rounds_left, float(inst["delta"]), str(inst["accountant"]))
    except Exception:  # noqa: BLE001 - an accountant that cannot say is no reason to stop the view
        return None
    return float(inst["dataset_epsilon"]) + max(0.0, job_at_end - float(inst["epsilon"]))


def institution_view(inst: dict, rounds: list[dict], planned: int, last_round: int, running: bool) -> dict:
    """One institution's card: its rounds, refusals, spend against budget, and a warning if it will not last."""
    name = inst["name"]
    declined = {str(r["round"]): str(r["declined"][name]) for r in rounds if name in (r.get("declined") or {})}
    dropped = {str(r["round"]): str(r["dropped"][name]) for r in rounds if name in (r.get("dropped") or {})}
    rejected = {str(r["round"]): str(r["rejected"][name]) for r in rounds
                if isinstance(r.get("rejected"), dict) and name in r["rejected"]}
    budget = inst.get("budget_epsilon")
    spent = inst.get("dataset_epsilon")
    remaining = None if budget is None or spent is None else budget - spent
    rounds_left = max(0, planned - last_round) if running else 0
    projected = projected_epsilon(inst, rounds_left)
    warnings = []
    if budget is not None and projected is not None and projected > budget + BUDGET_TOLERANCE:
        warnings.append(
            f"its budget will not last the planned {planned} rounds: at this job's noise and sampling the data "
            f"set would reach epsilon {projected:.4f} by round {planned}, over its budget of {budget:g} "
            "(it declines the rounds it cannot pay for)"
        )
    if budget is not None and spent is not None and spent >= budget - BUDGET_TOLERANCE and rounds_left > 0:
        warnings.append(f"its budget is spent ({spent:.4f} of {budget:g}) with {rounds_left} rounds to go")
    for rnd, why in declined.items():
        warnings.append(f"declined round {rnd}: {why}")
    per_round = inst.get("dataset_epsilon_per_round") or {}
    burn = sorted((int(rnd), float(eps)) for rnd, eps in per_round.items())
    job_per_round = inst.get("epsilon_per_round") or {}
    if burn and budget is not None and job_per_round.get(str(burn[0][0])) == burn[0][1]:
        burn.insert(0, (0, 0.0))  # a data set no earlier job spent on starts the job with its whole budget
    return {
        **{key: inst.get(key) for key in (
            "name", "examples", "rounds", "epsilon", "dataset_epsilon", "budget_epsilon", "granted_epsilon",
            "requested_epsilon", "target_epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "max_grad_norm", "steps",
            "bytes_up", "bytes_down", "train_seconds")},
        "declined": declined,
        "dropped": dropped,
        "rejected": rejected,
        "remaining_epsilon": remaining,
        "projected_epsilon": projected,
        "warnings": warnings,
        # burn-down: what is left of the budget after each round the institution released in
        "burn": [[rnd, None if budget is None else budget - eps, eps] for rnd, eps in burn],
    }


def privacy_facts(metrics: dict, privacy: dict | None) -> dict:
    """The privacy report's facts: from privacy.json once written, else from the live metrics."""
    if privacy is None:
        try:
            from server.report import privacy_report

            privacy = privacy_report(metrics)
        except Exception:  # noqa: BLE001 - partial metrics: show what there is
            privacy = {}
    cfg = metrics.get("config") or {}
    insts = [i for i in metrics.get("institutions", []) if i.get("accountant") is not None]
    return {
        "guarantee": privacy.get("guarantee"),
        "mechanism": privacy.get("mechanism"),
        "secure_aggregation": metrics.get("secure_aggregation", (cfg.get("secure_aggregation") or {}).get("enabled")),
        "institution_level_dp": privacy.get("institution_level_dp", metrics.get("institution_dp")),
        "accountants": sorted({str(i["accountant"]) for i in insts}),
        "deltas": sorted({i["delta"] for i in insts if i.get("delta") is not None}),
        "sample_rates": {i["name"]: i.get("sample_rate") for i in insts},
        "noise_multipliers": {i["name"]: i.get("noise_multiplier") for i in insts},
        "clip_norms": sorted({i["max_grad_norm"] for i in insts if i.get("max_grad_norm") is not None}),
        "requested_epsilon": (cfg.get("privacy") or {}).get("target_epsilon"),
        "requested_delta": (cfg.get("privacy") or {}).get("delta"),
        "report": privacy,
    }


def read_steps(folder: Path) -> dict[str, dict]:
    """The latest step event of each institution (simulation only: counters and loss, never a record)."""
    latest: dict[str, dict] = {}
    try:
        with (folder / PROGRESS_FILE).open("rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    break  # a line still being written
                try:
                    event = json.loads(line)
                    latest[str(event["institution"])] = {k: event.get(k) for k in ("round", "step", "steps", "loss")}
                except (ValueError, KeyError, TypeError):
                    continue
    except OSError:
        pass
    return latest


def job_view(job_id: str, folder: Path | None, status: str, detail: str = "", submitted: str | None = None,
             planned: int | None = None, config: dict | None = None) -> dict:
    """Everything the page shows for one job."""
    final = _read_json(folder / METRICS_FILE) if folder else None
    metrics = final or (_read_json(folder / LIVE_FILE) if folder else None) or {}
    config = metrics.get("config") or config or {}
    planned = int((config.get("federation") or {}).get("rounds") or planned or 0)
    rounds = [r for r in metrics.get("rounds", []) if isinstance(r, dict) and "round" in r]
    last_round = max((int(r["round"]) for r in rounds), default=None)
    running = status not in ENDED
    institutions = [
        institution_view(inst, rounds, planned, last_round or 0, running) for inst in metrics.get("institutions", [])
    ]
    return {
        "id": job_id,
        "status": status,
        "detail": detail,
        "folder": str(folder) if folder else None,
        "submitted": submitted,
        "final": final is not None,
        "rounds_planned": planned,
        "round": last_round,
        "config": config,
        "rounds": [
            {key: r.get(key) for key in ("round", "accuracy", "loss", "train_loss", "bytes_up", "bytes_down", "seconds")}
            | {"declined": r.get("declined") or {}, "dropped": r.get("dropped") or {},
               "rejected": r.get("rejected") if isinstance(r.get("rejected"), dict) else {}}
            for r in rounds
        ],
        "institutions": institutions,
        "warnings": sum(len(i["warnings"]) for i in institutions),
        "steps": read_steps(folder) if folder and running else {},
        "privacy": privacy_facts(metrics, _read_json(folder / PRIVACY_FILE) if final and folder else None)
        if metrics else None,
        "wall_seconds": metrics.get("wall_seconds"),
        "model_path": metrics.get("model_path"),
        "trainable_parameters": metrics.get("trainable_parameters"),
    }


def _known(value) -> str | None:
    """Flower writes 'N/A' for a time that has not happened."""
    return None if value in (None, "", "N/A") else str(value)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass
class SimulatedJob:
    """The one job a `fedtune-sim --console` runs; its status is set by the simulation itself."""

    folder: Path
    job_id: str = ""
    status: str = PENDING
    detail: str = ""
    submitted: str = field(default_factory=now)
    config: dict | None = None

    def finish(self, status: str, detail: str = "") -> None:
        self.status, self.detail = status, detail

    def snapshot(self) -> dict:
        job = job_view(self.job_id or self.folder.name, self.folder, self.status, self.detail, self.submitted,
                       config=self.config)
        return {"mode": "simulation", "jobs": [job], "nodes": [], "nodes_error": "",
                "ended": self.status in ENDED}


class CoordinatorJobs:
    """A coordinator's jobs: fedtune's runs.json for their folders, Flower's `flwr ls` for their status.

    `flwr` is a subprocess (about a second), so its answers are refreshed in the background at most
    every `refresh` seconds; the files are read at every snapshot. Read-only: it never starts,
    stops or sends anything.
    """

    def __init__(self, state_dir: Path, refresh: float = 5.0):
        from server.coordinator import Coordinator

        self.coordinator = Coordinator(state_dir)
        self.refresh = refresh
        self.flower_runs: dict[str, dict] = {}
        self.nodes: list[dict] = []
        self.error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_flower(self) -> None:
        try:
            runs = {str(run["run-id"]): run for run in self.coordinator.runs()}
            nodes = self.coordinator.flwr("supernode", "ls")["nodes"]
            error = ""
        except Exception as exc:  # noqa: BLE001 - a coordinator that is down is shown, not fatal
            runs, nodes, error = {}, None, f"the coordinator's SuperLink did not answer: {exc}"
        names = {entry.get("node_id"): name for name, entry in
                 (_read_json(self.coordinator.institutions_file) or {}).items()}
        with self._lock:
            if nodes is not None:
                self.nodes = [
                    {"name": names.get(str(node.get("node-id")), "-"), "node_id": str(node.get("node-id")),
                     "status": node.get("status"), "online_at": _known(node.get("online-at")),
                     "offline_at": _known(node.get("offline-at")), "created_at": _known(node.get("created-at"))}
                    for node in nodes
                ]
                self.flower_runs = runs
            self.error = error

    def start(self) -> None:
        def loop() -> None:
            import common.accounting  # noqa: F401  (Opacus, matplotlib: seconds to import, so not in a request)
            import server.report  # noqa: F401

            while not self._stop.is_set():
                self.poll_flower()
                self._stop.wait(self.refresh)

        self._thread = threading.Thread(target=loop, name="console-flwr-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> dict:
        known = _read_json(self.coordinator.runs_file) or {}
        with self._lock:
            flower_runs, nodes, error = dict(self.flower_runs), list(self.nodes), self.error
        jobs = []
        for run_id, entry in sorted(known.items(), key=lambda item: str(item[1].get("submitted", "")), reverse=True):
            folder = Path(entry["out"]) if entry.get("out") else None
            run = flower_runs.get(run_id)
            if run is not None:
                status = FLOWER_STATUS.get(str(run.get("status")), str(run.get("status")))
                details = str(run.get("status-details") or "")
                detail = "" if details in ("", "N/A") or status == FINISHED else _describe(details)
            elif folder is not None and (folder / METRICS_FILE).is_file():
                status, detail = FINISHED, "(from its run folder; the SuperLink did not answer)"
            else:
                status, detail = UNKNOWN, "the SuperLink has not answered yet" if not error else error
            resumed_by = [later for later, other in known.items() if other.get("resumes") == run_id]
            if resumed_by:  # a coordinator restart interrupted it (server/coordinator.py `resume`)
                detail = f"interrupted; resumed as run {resumed_by[0]}"
            elif entry.get("interrupted"):
                detail = "interrupted by a coordinator restart; not resumed yet"
            elif entry.get("resumes"):
                detail = " ".join(filter(None, [detail, f"(resumes run {entry['resumes']} from its checkpoint)"]))
            jobs.append(job_view(run_id, folder, status, detail, entry.get("submitted"), entry.get("rounds")))
        faults = [dict(asdict(event), sentence=event.sentence())
                  for event in fleet_events.read(self.coordinator.state / fleet_events.FLEET_EVENTS_FILE, last=20)]
        return {"mode": "coordinator", "jobs": jobs, "nodes": nodes, "nodes_error": error, "faults": faults,
                "ended": False}
