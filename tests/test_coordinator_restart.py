"""The coordinator dies mid-round and comes back: real processes over TLS, nothing paid twice.

`fedtune-server start` supervises its SuperLink. The test SIGKILLs the SuperLink's whole process
group (SuperLink, SuperExec, the job's ServerApp) once both institutions have released round 2 of
2: the supervisor restarts the SuperLink on the same state database and resumes the job from its
round-1 checkpoint as the same job; the institutions' daemons rejoin by themselves. Every wait has
a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common.accounting import epsilon
from deployment_support import join, start_coordinator, tail, write_job
from server import checkpoint
from common.config import JobConfig
from server.cli import _recover_jobs, main
from server.coordinator import Coordinator, CoordinatorError

ROUNDS = 2
BUDGET = 100.0  # deployment_support.TEST_BUDGET


def released(ledger: PrivacyLedger, job_id: str) -> list[int]:
    if not ledger.path.is_file() or not ledger.datasets():
        return []
    return [r.round for r in ledger.releases(ledger.datasets()[0].id) if r.job == job_id]


def superlink_group(supervisor_pid: int) -> int:
    """The process group of the SuperLink `fedtune-server start` runs (its own session)."""
    for child in psutil.Process(supervisor_pid).children():
        if "server.superlink" in " ".join(child.cmdline()):
            return os.getpgid(child.pid)
    raise AssertionError("no SuperLink under the coordinator")


def wait(condition, timeout: float, what: str, log) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s\n{tail(log)}"
        time.sleep(0.05)


def test_a_coordinator_killed_mid_round_restarts_resumes_and_the_job_finishes_within_budget(
        processes, certs, data_files, banking_slice, slice_labels, bundle, tmp_path, env):
    coordinator = start_coordinator(processes, tmp_path / "state", certs, env)
    join(processes, coordinator, data_files, bundle, env)
    ledgers = {name: PrivacyLedger(processes.folder / name / "state" / LEDGER_FILE) for name in data_files}
    job_file = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels, federation={"rounds": ROUNDS},
                         privacy={"target_epsilon": 8.0})
    out = tmp_path / "run"
    submitted = coordinator.run("submit", job_file, "--out", out, "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = re.search(r"submitted run (\d+)", submitted.stdout).group(1)
    job_id = json.loads((coordinator.state / "runs.json").read_text())[run_id]["job_id"]

    # Mid-round 2: both institutions have released their round-2 updates, the coordinator has not aggregated them.
    wait(lambda: all(2 in released(ledger, job_id) for ledger in ledgers.values()), 240, "round 2 not released",
         coordinator.log)
    assert checkpoint.latest(out).server_round == 1
    os.killpg(superlink_group(coordinator.process.pid), signal.SIGKILL)

    # The supervisor restarts the SuperLink and resumes the job; the daemons rejoin on their own.
    runs_file = coordinator.state / "runs.json"
    wait(lambda: any(entry.get("resumes") == run_id for entry in json.loads(runs_file.read_text()).values()), 180,
         "the job was not resumed", coordinator.log)
    resumed = next(rid for rid, entry in json.loads(runs_file.read_text()).items() if entry.get("resumes") == run_id)
    wait(lambda: (out / "metrics.json").is_file(), 300, "the resumed job did not finish", coordinator.log)
    log = coordinator.log.read_text()
    assert "flower-superlink exited" in log and f"resumed as run {resumed}" in log
    for name in data_files:
        coordinator.wait_for(name, "online", timeout=60)

    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(ROUNDS + 1))
    assert metrics["job_id"] == job_id and [s["after_round"] for s in metrics["sessions"]] == [0, 1]
    privacy = json.loads((out / "privacy.json").read_text())
    (lost,) = privacy["lost_rounds"]
    assert lost["round"] == 2 and lost["asked"] == sorted(data_files)  # both had been asked when it died
    assert "- Round 2: asked of alpha and beta" in (out / "privacy.md").read_text()
    assert "lost in the coordinator crash" in (out / "privacy.md").read_text()
    if sorted(metrics["rounds"][ROUNDS]["declined"]) == sorted(data_files):  # the lost last round, not retrained
        assert lost["declined_retry"] == {name: "budget-spent" for name in data_files} and lost["last"]
        assert ("no budget remained in their grant to train it again" in (out / "privacy.md").read_text()
                and "the job ended with that model" in (out / "privacy.md").read_text())
    for name, ledger in ledgers.items():
        dataset = ledger.datasets()[0]
        assert list(ledger.grants(dataset.id)) == [job_id]  # one grant, one noise plan across the resume
        # The lost release stays spent; the resumed round 2 is released again only if the grant still has room.
        again = [2] if name not in metrics["rounds"][ROUNDS]["declined"] else []
        assert sorted(released(ledger, job_id)) == [1, 2, *again]
        history = ledger.history(dataset.id)
        assert ledger.spent(dataset.id) == epsilon(history, dataset.budget.delta, dataset.budget.accountant) <= BUDGET
        assert ledger.spent(dataset.id, job_id) <= ledger.grant(dataset.id, job_id).granted + 1e-9

    status = coordinator.run("status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line.split()}
    assert f"resumed as {resumed}" in rows[run_id] and "completed" in rows[resumed] and f"{ROUNDS}/{ROUNDS}" in rows[resumed]
    exported = coordinator.run("export", resumed, "--to", tmp_path / "copy")
    assert exported.returncode == 0, exported.stderr


def test_export_of_a_job_with_nothing_to_export_says_so_and_fails(tmp_path, monkeypatch, capsys):
    """The operator's report of a crashed run: `export` copied an empty folder and said it succeeded.
    Flower's answer (`flwr ls`) is stood in for; the run folder and runs.json are fedtune's own."""
    coordinator = Coordinator(tmp_path / "state")
    coordinator.state.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    checkpoint.claim_run_folder(out, "job-0123456789abcdef", "{}", {"after_round": 0})
    (coordinator.state / "runs.json").write_text(json.dumps({"7": {"out": str(out), "job_id": "job-0123456789abcdef",
                                                                    "rounds": 2}}))
    flower = [{"run-id": 7, "status": "finished:failed"}]
    monkeypatch.setattr(Coordinator, "flwr", lambda self, *args, **kw: {"runs": flower, "success": True})
    code = main(["export", "7", "--to", str(tmp_path / "copy"), "--state-dir", str(coordinator.state)])
    assert code == 1 and not (tmp_path / "copy").exists()
    assert ("run 7 ended finished:failed after round 0 with no results to export; resume it with "
            "`fedtune-server resume 7`") in capsys.readouterr().err
    # A folder another job took over is not this run's to export either.
    (tmp_path / "other").mkdir()
    checkpoint.claim_run_folder(tmp_path / "other", "job-fedcba9876543210", "{}", {"after_round": 0})
    (coordinator.state / "runs.json").write_text(json.dumps({"7": {"out": str(tmp_path / "other"),
                                                                    "job_id": "job-0123456789abcdef"}}))
    with pytest.raises(CoordinatorError, match="holds another job's files"):
        coordinator.export("7", tmp_path / "copy")


# -- which jobs the supervisor resumes: the run folders' record decides ------------------------------

def job_folder(root, name: str, job_id: str, sessions: list[tuple[str, int]], saved: int, finished: bool = False):
    """A run folder as the ServerApp leaves it: job.json with a session per run, a checkpoint of round `saved`."""
    out = root / name
    out.mkdir()
    for run_id, after in sessions:
        checkpoint.claim_run_folder(out, job_id, "{}", {"run_id": run_id, "after_round": after})
    if saved:
        checkpoint.save(out, checkpoint.Checkpoint(job_id=job_id, server_round=saved, job_json="{}",
                                                   weights=[np.zeros(2)], strategy={}, round_log={}, evaluations={}))
    if finished:
        (out / "metrics.json").write_text("{}")
    return out


@pytest.fixture
def supervised(tmp_path, monkeypatch):
    """A coordinator state folder whose runs.json and run folders hold each case; Flower's `flwr ls` stood in for."""
    coordinator = Coordinator(tmp_path / "state")
    coordinator.state.mkdir()
    cases = {  # run id: (Flower's status, sessions of its job in job.json, checkpoint round, finished, runs.json extra)
        "1": ("finished:failed", [("1", 0)], 1, False, {}),  # failed after round 1: resumed
        "2": ("finished:failed", [("2", 0)], 0, False, {}),  # failed before any checkpoint: left to the operator
        "3": ("finished:completed", [("3", 0)], 2, True, {}),  # finished
        "4": ("running", [("4", 0)], 1, False, {}),  # still running: never resumed beside itself
        "5": ("finished:stopped", [("5", 0)], 1, False, {}),  # stopped by the operator
        "6": ("finished:stopped", [("6", 0)], 1, False, {"interrupted": "t"}),  # stopped by a SuperLink restart
        "8": ("finished:failed", [("7", 0), ("8", 1)], 1, False, {"resumes": "7"}),  # failed where it resumed
        "10": ("finished:failed", [("9", 0), ("10", 1)], 2, False, {"resumes": "9"}),  # failed after progress
    }
    runs, flower = {}, []
    for run_id, (status, sessions, saved, finished, extra) in cases.items():
        job_id = f"job-{int(sessions[0][0]):016x}"
        out = job_folder(tmp_path, f"run{sessions[0][0]}", job_id, sessions, saved, finished)
        for earlier, _ in sessions[:-1]:  # the runs a later one resumed
            runs[earlier] = {"out": str(out), "job_id": job_id, "rounds": 2, "interrupted": "t"}
            flower.append({"run-id": int(earlier), "status": "finished:stopped"})
        runs[run_id] = {"out": str(out), "job_id": job_id, "rounds": 2, **extra}
        flower.append({"run-id": int(run_id), "status": status})
    (coordinator.state / "runs.json").write_text(json.dumps(runs))
    monkeypatch.setattr(Coordinator, "flwr", lambda self, *args, **kw: {"runs": flower, "success": True})
    return coordinator


def test_the_supervisor_resumes_every_unfinished_job_its_run_folders_record_and_no_other(supervised):
    assert sorted(supervised.to_resume(), key=int) == ["1", "6", "10"]


def test_the_supervisor_resumes_each_job_once_and_with_no_resume_only_names_it(supervised, monkeypatch, capsys):
    resumed = []
    monkeypatch.setattr(Coordinator, "resume", lambda self, run_id: resumed.append(run_id) or f"{run_id}00")
    tried: set[str] = set()
    _recover_jobs(supervised, True, tried)
    _recover_jobs(supervised, True, tried)  # the next look: the stand-in resume recorded no new run
    assert sorted(resumed, key=int) == ["1", "6", "10"]
    assert "run 10 was interrupted; resumed as run 1000 from its last checkpoint" in capsys.readouterr().out
    _recover_jobs(supervised, False, named := set())
    assert sorted(resumed, key=int) == ["1", "6", "10"] and named == {"1", "6", "10"}
    assert "resume it with `fedtune-server resume 1`" in capsys.readouterr().out


def test_a_run_is_never_resumed_twice_at_once(supervised, monkeypatch):
    """The supervisor and an operator's `fedtune-server resume` at the same moment: one resumes, one is refused."""
    def slow_submit(self, job, out, job_id=None, resumes=None):
        time.sleep(0.5)  # `flwr run` takes seconds: the other resume must wait, then see it resumed
        runs = json.loads(self.runs_file.read_text())
        runs[f"{resumes}00"] = {"out": str(out), "job_id": job_id, "resumes": resumes, "rounds": 2}
        self.runs_file.write_text(json.dumps(runs))
        return f"{resumes}00"

    monkeypatch.setattr(Coordinator, "submit", slow_submit)
    monkeypatch.setattr(JobConfig, "model_validate", classmethod(lambda cls, data: data))
    outcomes = []

    def resume() -> None:
        try:
            outcomes.append(Coordinator(supervised.state).resume("1"))
        except CoordinatorError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["100", "run 1 is resumed; only an interrupted job is resumed"]
    assert "1" not in supervised.to_resume()
