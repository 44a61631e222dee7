"""A job whose ServerApp dies while the SuperLink lives is resumed by the supervisor: real processes over TLS.

Flower marks such a run `finished:failed` once the ServerApp's heartbeats stop (about a minute);
the supervisor's next look (server/cli.py, every RECOVERY_POLL seconds) finds the run folder's job
unfinished with a checkpoint newer than where the run started, and resumes it as the same job. The
SuperLink is never restarted. Every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import signal

import psutil
import pytest

from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common.accounting import epsilon
from deployment_support import join, start_coordinator, write_job
from server import checkpoint
from test_coordinator_restart import wait

pytestmark = pytest.mark.timeout(600)


def serverapp_of(supervisor_pid: int) -> psutil.Process:
    for child in psutil.Process(supervisor_pid).children(recursive=True):
        if "flwr-serverapp" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no ServerApp under the coordinator")


def test_a_job_whose_serverapp_failed_is_resumed_by_the_supervisor_and_finishes(
        processes, certs, data_files, banking_slice, slice_labels, bundle, tmp_path, env):
    coordinator = start_coordinator(processes, tmp_path / "state", certs, env)
    join(processes, coordinator, data_files, bundle, env)
    ledgers = {name: PrivacyLedger(processes.folder / name / "state" / LEDGER_FILE) for name in data_files}
    job_file = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels, federation={"rounds": 2},
                         privacy={"target_epsilon": 8.0})
    out = tmp_path / "run"
    submitted = coordinator.run("submit", job_file, "--out", out, "--detach")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = re.search(r"submitted run (\d+)", submitted.stdout).group(1)

    wait(lambda: (saved := checkpoint.latest(out)) is not None and saved.server_round == 1, 240,
         "no checkpoint of round 1", coordinator.log)
    superlink = [p.pid for p in psutil.Process(coordinator.process.pid).children() if "superlink" in " ".join(p.cmdline())]
    serverapp_of(coordinator.process.pid).send_signal(signal.SIGKILL)

    runs_file = coordinator.state / "runs.json"
    wait(lambda: any(entry.get("resumes") == run_id for entry in json.loads(runs_file.read_text()).values()), 240,
         "the failed job was not resumed", coordinator.log)
    resumed = next(rid for rid, entry in json.loads(runs_file.read_text()).items() if entry.get("resumes") == run_id)
    assert {str(run["run-id"]): run["status"] for run in coordinator.runs()}[run_id] == "finished:failed"
    # The ServerApp writes metrics.json, then exits; Flower marks the run finished only after that.
    wait(lambda: {str(run["run-id"]): run["status"] for run in coordinator.runs()}.get(resumed) == "finished:completed",
         300, "the resumed job did not finish", coordinator.log)
    log = coordinator.log.read_text()
    assert f"run {run_id} was interrupted; resumed as run {resumed}" in log and "flower-superlink exited" not in log
    assert [p.pid for p in psutil.Process(coordinator.process.pid).children()
            if "superlink" in " ".join(p.cmdline())] == superlink  # the same SuperLink throughout

    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert [s["after_round"] for s in metrics["sessions"]] == [0, 1] and log.count("resumed as run") == 1
    job_id = metrics["job_id"]
    for ledger in ledgers.values():
        dataset = ledger.datasets()[0]
        assert list(ledger.grants(dataset.id)) == [job_id]
        history = ledger.history(dataset.id)
        assert ledger.spent(dataset.id) == epsilon(history, dataset.budget.delta, dataset.budget.accountant) \
            <= dataset.budget.epsilon
        assert ledger.spent(dataset.id, job_id) <= ledger.grant(dataset.id, job_id).granted + 1e-9
    status = coordinator.run("status")
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:] if line.split()}
    assert f"resumed as {resumed}" in rows[run_id] and "completed" in rows[resumed]
