"""The coordinator's side of a deployment: its SuperLink, its institutions and its jobs.

Everything the coordinator operator does goes through Flower's own programs: `flower-superlink`
runs the federation, and the `flwr` CLI admits institutions and submits jobs over the SuperLink's
TLS control API. fedtune adds what Flower does not keep: the institutions' names (Flower 1.39
stores a node's name but never lists it) and which run folder belongs to which run. Institutions
run only app bundles they approved by hash; `bundle_hash` tells the operator which hash to send.

The state folder holds the SuperLink database, a private FLWR_HOME whose `config.toml` names the
connection `fedtune`, `institutions.json` and `runs.json`. It must lie outside the app folder:
`flwr run` ships every .py/.toml/.json/.md file of that folder to every institution. It is 0700
and its files 0600: it also holds the two secrets that make the SuperLink's local APIs answer
only this user (`control.token` for the Control API, `superexec.secret` for the Runtime API's
task claims; server/superlink.py), both new at every start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sys
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import tomli_w
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.build import build_fab_from_disk
from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY, REFRESH_TOKEN_STORE_KEY
from flwr.common.constant import AuthnType
from flwr.supercore.credential_store import FileCredentialStore

from common.config import (
    DEFAULT_PACE,
    JOB_ID_KEY,
    NAMES_KEY,
    OUT_DIR_KEY,
    REPO_ROOT,
    RUN_CONFIG_KEY,
    ConfigError,
    JobConfig,
    Pace,
    load_config,
    new_job_id,
)
from common.data import read_job_records
from common.model_files import default_model_path, model_digest
from common.processes import FlowerProcess, dial_host, flower_env, flower_executable, write_private, write_secret
from common.superexec import SECRET_FILE
from server import control
from server.control import CONNECTION
from server.fleet_events import FLEET_EVENTS_FILE
from server.pki import CA_CERT, SERVER_CERT, SERVER_KEY
from server.run_folder import JOB_FILE, METRICS_FILE

INSTITUTIONS_FILE = "institutions.json"  # in the state folder: fedtune's names of the admitted node keys
CONTROL_TOKEN = "control.token"  # in the state folder: what the Control API accepts (server/superlink.py)
FINISHED = "finished"
COMPLETED = "finished:completed"
FAILED = "finished:failed"
RESUME_LOCK = "resume.lock"
STATUS_CHECK_SECONDS = 30.0  # see `Coordinator.follow`


class CoordinatorError(RuntimeError):
    """An operation the coordinator refused or could not do; one line, for the operator."""


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        folder = Path(folder).resolve()
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)


def outside_app_folder(path: Path, what: str) -> Path:
    """Refuse folders whose files `flwr run` would pack into the app bundle sent to institutions."""
    path = Path(path).expanduser().resolve()
    inside = path == REPO_ROOT or REPO_ROOT in path.parents
    if inside and not (REPO_ROOT / "runs" in path.parents):
        raise CoordinatorError(
            f"{what} {path} is inside the app folder {REPO_ROOT}, whose files Flower ships to every "
            "institution; use a folder outside it (or under runs/)"
        )
    return path


def bundle_hash(app: Path = REPO_ROOT) -> str:
    """The SHA-256 of the app bundle `flwr run` would ship from `app` now, which is the hash each
    institution checks. Built by the same Flower function `flwr run` calls; its zip is deterministic
    (sorted paths, fixed timestamps), so the hash changes only when a bundled file does."""
    try:
        return hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    except ValueError as exc:
        raise CoordinatorError(f"{app}: cannot build the app bundle: {_one_line(str(exc))}") from None


def superlink_command(state: Path, host: str, port: int, fleet_address: str, tls: TlsFiles | None,
                      pace: Pace = DEFAULT_PACE) -> list[str]:
    """Flower's `flower-superlink` flags, run through server/superlink.py (Control API token, fedtune's
    SuperExec, TLS 1.3, `pace` of its chores); secrets travel as file paths only."""
    command = [sys.executable, "-m", "server.superlink", "--control-token-file", str(state / CONTROL_TOKEN),
               "--fleet-events-file", str(state / FLEET_EVENTS_FILE),
               "--institutions-file", str(state / INSTITUTIONS_FILE), "--pace", pace, "--"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
                    "--enable-supernode-auth"]
    return command + [
        "--host", host, "--port", str(port),
        "--fleet-api-address", fleet_address,  # Flower's default binds every interface
        "--database", str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
        "--isolation", "process", "--superexec-auth-secret-file", str(state / SECRET_FILE),
    ]


def validate_job(path: Path) -> JobConfig:
    """The job as the coordinator will run it, or a one-line reason it cannot run."""
    job = load_config(path)
    if job.data.labels is None:
        raise ConfigError(f"{path}: data.labels: a deployed job must list its labels (no single party sees every file)")
    if job.data.test_path is None:
        raise ConfigError(f"{path}: data.test_path: the coordinator needs a held-out file to evaluate on")
    # A test label outside the label set would only fail on the coordinator after the first round.
    test = read_job_records(job.data.test_path, job.data)
    if job.data.labels:
        test.label_ids(job.data.labels)
    # Institutions load their own pinned model folder and refuse a job whose model digest differs.
    folder = job.model.path or default_model_path(job.model.task)
    try:
        job.model.sha256 = model_digest(folder)
    except FileNotFoundError:
        raise ConfigError(f"{path}: model.path: {folder}: no such model folder") from None
    return job


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Using SuperLink")]
    return " ".join(lines) or "no output"


def _write_json(path: Path, data: dict) -> None:
    write_private(path, (json.dumps(data, indent=2) + "\n").encode())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def check_public_key(path: Path) -> str:
    """The OpenSSH public key line, if it is an EC key on a NIST curve (what Flower accepts)."""
    path = Path(path)
    if not path.is_file():
        raise CoordinatorError(f"{path}: no such file")
    line = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CoordinatorError(f"{path}: not an OpenSSH public key (expected one 'ecdsa-sha2-nistp384 ...' line)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise CoordinatorError(f"{path}: not an EC key; the institution should run `fedtune-client keygen`")
    return line


class Coordinator:
    """The coordinator's state folder and the `flwr` commands run against its SuperLink."""

    def __init__(self, state_dir: Path):
        self.state = Path(state_dir).expanduser().resolve()
        self.flwr_home = self.state / "flwr-home"
        self.institutions_file = self.state / INSTITUTIONS_FILE
        self.runs_file = self.state / "runs.json"

    # -- connection ----------------------------------------------------------------------------

    def write_connection(self, host: str, port: int, ca: Path | None) -> str:
        """Point the private FLWR_HOME at this SuperLink, with fresh secrets; returns the address the CLI dials.

        The Control API token goes where the `flwr` CLI keeps an OIDC login (FLWR_HOME/credentials.yaml,
        in Flower's own format), so every `flwr` command fedtune runs presents it as a bearer token.
        """
        address = f"{dial_host(host)}:{port}"
        connection: dict = {"address": address}
        if ca is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(Path(ca).resolve())
        self.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        write_private(self.flwr_home / "config.toml", tomli_w.dumps(config).encode())
        token = secrets.token_hex(32)
        write_private(self.state / CONTROL_TOKEN, token.encode())
        credentials = self.flwr_home / "credentials.yaml"
        credentials.unlink(missing_ok=True)  # a token for an earlier address or start is void
        store = FileCredentialStore(credentials)  # writes through an owner-only temporary file
        store.set(AUTHN_TYPE_STORE_KEY % address, AuthnType.OIDC.encode())
        store.set(ACCESS_TOKEN_STORE_KEY % address, token.encode())
        store.set(REFRESH_TOKEN_STORE_KEY % address, b"none")  # the CLI needs one; TokenAuthn refreshes nothing
        write_secret(self.state / SECRET_FILE)
        return address

    def env(self) -> dict[str, str]:
        return flower_env(self.flwr_home)

    def flwr(self, *args: str, timeout: float = 120) -> dict:
        """Run `flwr ARGS fedtune --format json`; its JSON answer, or CoordinatorError with Flower's reason.

        Listing runs and nodes is asked in this process (server/control.py: the same code, without a
        `flwr` process of 2 CPU-seconds). Flower's CLI exits 0 even when it failed, so success is read
        from the answer itself.
        """
        if not (self.flwr_home / "config.toml").is_file():
            raise CoordinatorError(f"{self.state}: no coordinator here; start one with `fedtune-server start --state-dir {self.state}`")
        try:
            answer = control.ask(self.flwr_home, self.state / CONTROL_TOKEN, *args)
        except control.ControlError as error:
            raise CoordinatorError(_one_line(str(error))) from None
        if answer is not None:
            return answer
        result = subprocess.run(
            [flower_executable("flwr"), *args, CONNECTION, "--format", "json"],
            env=self.env(), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        start = result.stdout.find("{")
        try:
            answer = json.loads(result.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise CoordinatorError(f"flwr {args[0]}: {_one_line(result.stdout + result.stderr)}")
        if not answer.get("success", False):
            raise CoordinatorError(_one_line(str(answer.get("error-message", "failed"))))
        return answer

    # -- institutions --------------------------------------------------------------------------

    def admit(self, public_key: Path, name: str) -> str:
        line = check_public_key(public_key)
        registry = _read_json(self.institutions_file)
        if name in registry and not registry[name].get("revoked"):
            raise CoordinatorError(f"an institution named {name!r} is already admitted (node {registry[name]['node_id']})")
        answer = self.flwr("supernode", "register", str(public_key), "--name", name)
        node_id = str(answer["node-id"])
        registry[name] = {"node_id": node_id, "public_key": line, "admitted": _now(), "revoked": None}
        _write_json(self.institutions_file, registry)
        return node_id

    def institutions(self) -> list[dict]:
        """Every node the SuperLink knows, with fedtune's name for it and Flower's status."""
        nodes = self.flwr("supernode", "ls")["nodes"]
        names = {entry["node_id"]: name for name, entry in _read_json(self.institutions_file).items()}
        return [
            {"name": names.get(str(node["node-id"]), "-"), "node_id": str(node["node-id"]), "status": node["status"],
             "since": node.get("online-at") if node["status"] == "online" else node.get("created-at")}
            for node in nodes
        ]

    def revoke(self, name_or_id: str) -> tuple[str, str]:
        registry = _read_json(self.institutions_file)
        if name_or_id in registry:
            name, node_id = name_or_id, registry[name_or_id]["node_id"]
        else:
            matches = [name for name, entry in registry.items() if entry["node_id"] == name_or_id]
            if not matches and not name_or_id.isdigit():
                raise CoordinatorError(f"no institution named {name_or_id!r} (see `fedtune-server institutions`)")
            name, node_id = (matches[0] if matches else "-"), name_or_id
        self.flwr("supernode", "unregister", node_id)
        if name in registry:
            registry[name]["revoked"] = _now()
            _write_json(self.institutions_file, registry)
        return name, node_id

    # -- jobs ----------------------------------------------------------------------------------

    def submit(self, job: JobConfig, out: Path, job_id: str | None = None, resumes: str | None = None) -> str:
        """Start the job on the SuperLink; the run id. `out` must be an absolute coordinator path.
        `job_id`/`resumes`: continue that job (its run `resumes` was interrupted) from its run folder's checkpoint."""
        needed = job.federation.institutions
        admitted = [node for node in self.institutions() if node["status"] != "unregistered"]
        if len(admitted) < needed:
            raise CoordinatorError(
                f"the job needs {needed} institutions (federation.institutions) but {len(admitted)} are admitted"
            )
        # A run-config file, not `--run-config "job='...'"`: the JSON may hold quotes of either kind.
        job_id = job_id or new_job_id()
        run_config = {RUN_CONFIG_KEY: job.to_json(), OUT_DIR_KEY: str(out), JOB_ID_KEY: job_id,
                      NAMES_KEY: json.dumps({node["node_id"]: node["name"] for node in admitted if node["name"] != "-"})}
        fd, config_path = tempfile.mkstemp(suffix=".toml", dir=self.state)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(tomli_w.dumps(run_config))
            answer = self.flwr("run", str(REPO_ROOT), "--run-config", config_path, timeout=600)
        finally:
            os.unlink(config_path)
        run_id = str(answer["run-id"])
        runs = _read_json(self.runs_file)
        runs[run_id] = {"out": str(out), "submitted": _now(), "institutions": needed, "rounds": job.federation.rounds,
                        "job_id": job_id, "resumes": resumes}
        _write_json(self.runs_file, runs)
        return run_id

    def resume(self, run_id: str) -> str:
        """Submit again the job of an interrupted run, with its job id and run folder: the ServerApp continues
        from the folder's last checkpoint and the institutions from the grant and noise plan they keep for the
        job id. The new run id. One resume at a time (a lock in the state folder): a run is never resumed twice,
        by the supervisor and an operator at once."""
        with _locked(self.state / RESUME_LOCK):
            return self._resume(run_id)

    def _resume(self, run_id: str) -> str:
        known = _read_json(self.runs_file).get(run_id)
        if known is None:
            raise CoordinatorError(f"no run {run_id} in {self.runs_file} (see `fedtune-server status`)")
        state = self.job_state(run_id)
        if state["state"] not in ("interrupted",):
            raise CoordinatorError(f"run {run_id} is {state['state']}; only an interrupted job is resumed")
        out = Path(known["out"])
        owner = _read_json(out / JOB_FILE)
        if owner.get("job_id") != known.get("job_id"):
            raise CoordinatorError(f"{out}: no record of job {known.get('job_id')} (its {JOB_FILE} is missing or "
                                   "another job's); nothing to resume")
        job = JobConfig.model_validate(owner["job"])
        return self.submit(job, out, job_id=owner["job_id"], resumes=run_id)

    def job_state(self, run_id: str, flower_runs: dict[str, dict] | None = None) -> dict:
        """A run's job as the operator sees it: running, interrupted (its run ended without finishing the
        job, or was superseded by a SuperLink restart), resumed (by a later run) or completed, with its
        last checkpointed round."""
        from server import checkpoint  # NumPy: only for the commands that read checkpoints

        runs = _read_json(self.runs_file)
        known = runs.get(run_id, {})
        status = (flower_runs or {str(row["run-id"]): row for row in self.flwr("ls")["runs"]}).get(
            run_id, {}).get("status", "unknown")
        out = Path(known["out"]) if known.get("out") else None
        try:
            saved = checkpoint.latest(out) if out is not None else None
        except checkpoint.CheckpointError:  # every checkpoint torn: nothing to resume from but round 0
            saved = None
        last = saved.server_round if saved else 0
        later = [rid for rid, entry in runs.items() if entry.get("resumes") == run_id]
        if later:
            state = "resumed"
        elif status == COMPLETED and out is not None and (out / METRICS_FILE).is_file():
            state = "completed"
        elif status.startswith(FINISHED) or status == "unknown" or known.get("interrupted"):
            state = "interrupted"
        else:
            state = "running (resumed)" if known.get("resumes") else "running"
        return {"run_id": run_id, "job_id": known.get("job_id"), "state": state, "flower_status": status,
                "last_round": last, "rounds": known.get("rounds"), "resumed_by": later[0] if later else None}

    def interrupted_by_restart(self) -> None:
        """After the SuperLink (re)started: the runs whose ServerApp died with the SuperLink before it. Flower still
        calls them running, so each is stopped in Flower and marked interrupted in runs.json (`to_resume` reads
        the mark)."""
        runs = _read_json(self.runs_file)
        flower = {str(row["run-id"]): row for row in self.flwr("ls")["runs"]}
        lost = [run_id for run_id, entry in runs.items() if not entry.get("interrupted")
                and not flower.get(run_id, {"status": FINISHED})["status"].startswith(FINISHED)]
        for run_id in lost:
            try:
                self.flwr("stop", run_id)
            except CoordinatorError:
                pass  # already ended on Flower's side: it is interrupted all the same
            runs[run_id]["interrupted"] = _now()
        if lost:
            _write_json(self.runs_file, runs)

    def to_resume(self) -> list[str]:
        """The runs whose job the supervisor resumes, by the run folders' own record: the latest run of each
        job whose folder holds no results (metrics.json) yet and that Flower has ended, either interrupted by
        a SuperLink restart or failed after its checkpoint moved past where the run started (one that failed
        where it started would fail there again: `fedtune-server resume` is the operator's call). A run still
        running, completed, stopped by the operator or already resumed is not resumed."""
        runs = _read_json(self.runs_file)
        superseded = {entry.get("resumes") for entry in runs.values()}
        unfinished = [run_id for run_id, entry in runs.items() if run_id not in superseded and entry.get("out")
                      and not (Path(entry["out"]) / METRICS_FILE).is_file()]
        if not unfinished:
            return []  # nothing to ask Flower about
        flower = {str(row["run-id"]): row["status"] for row in self.flwr("ls")["runs"]}
        return [run_id for run_id in unfinished if runs[run_id].get("interrupted")
                or (flower.get(run_id) == FAILED and self._failed_after_progress(run_id, runs[run_id]))]

    def _failed_after_progress(self, run_id: str, entry: dict) -> bool:
        """Whether the failed run's job.json session started before the folder's newest checkpoint."""
        from server import checkpoint  # NumPy: only for the commands that read checkpoints

        out = Path(entry["out"])
        owner = _read_json(out / JOB_FILE)
        started = [int(s["after_round"]) for s in owner.get("sessions", []) if str(s.get("run_id")) == run_id]
        try:
            saved = checkpoint.latest(out)
        except checkpoint.CheckpointError:
            return False
        return owner.get("job_id") == entry.get("job_id") and bool(started) and saved is not None \
            and saved.server_round > started[-1]

    def runs(self, run_id: str | None = None) -> list[dict]:
        """Flower's record of each run, plus the run folder fedtune gave it."""
        args = ("ls", "--run-id", run_id) if run_id else ("ls",)
        known = _read_json(self.runs_file)
        rows = self.flwr(*args)["runs"]
        return [dict(row, out=known.get(str(row["run-id"]), {}).get("out")) for row in rows]

    def follow(self, run_id: str, show_logs: bool = True, poll: float = 3.0,
               check: float = STATUS_CHECK_SECONDS) -> dict:
        """Wait for the run to finish; the run's final record.

        A `flwr ls` process every 3 s took a sixth of a 2-core machine from the job it waited for
        (BENCHMARKS.md). So the wait is on Flower's log stream of the run (one process, shown unless
        `show_logs` is False), which ends when the run has finished; the status (asked in this process,
        server/control.py) is checked when it ends and every `check` s besides; once the stream is gone without the run
        having finished (it broke, e.g. when the SuperLink was restarted), after `poll` s, doubling up to
        `check` (a stream started again would print the log again from its start).
        """
        stream = FlowerProcess([flower_executable("flwr"), "log", run_id, CONNECTION, "--stream"], self.env(),
                               stdout=None if show_logs else subprocess.DEVNULL)
        try:
            while not (run := self.runs(run_id)[0])["status"].startswith(FINISHED):
                if stream.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        stream.wait(timeout=check)
                else:
                    time.sleep(poll)
                    poll = min(2 * poll, check)
            if show_logs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    stream.wait(timeout=15)  # the rest of the log: the stream ends by itself once the run has finished
            return run
        finally:
            stream.stop(grace=2)

    def export(self, run_id: str, to: Path) -> Path:
        run = self.runs(run_id)[0]
        if not run["status"].startswith(FINISHED):
            raise CoordinatorError(f"run {run_id} is {run['status']}; export it once it has finished")
        if not run["out"] or not Path(run["out"]).is_dir():
            raise CoordinatorError(f"run {run_id}: no run folder recorded in {self.runs_file}")
        known = _read_json(self.runs_file).get(run_id, {})
        if _read_json(Path(run["out"]) / JOB_FILE).get("job_id") != known.get("job_id"):
            raise CoordinatorError(f"run {run_id}: its run folder {run['out']} holds another job's files")
        if not (Path(run["out"]) / METRICS_FILE).is_file():
            state = self.job_state(run_id)
            raise CoordinatorError(
                f"run {run_id} ended {run['status']} after round {state['last_round']} with no results to export"
                + (f"; it was resumed as run {state['resumed_by']}" if state["resumed_by"] else
                   f"; resume it with `fedtune-server resume {run_id}`"))
        to = Path(to).expanduser().resolve()
        if to.exists():
            raise CoordinatorError(f"{to}: already exists; name a new folder")
        shutil.copytree(run["out"], to)
        return to


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created if need be) for the block; released when the process dies too."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
