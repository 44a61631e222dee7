"""Checkpoints and resume without a network: strategy state, torn files, run-folder ownership."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common import messages as m
from common.accounting import epsilon
from common.config import load_config
from server import checkpoint, report
from server.checkpoint import Checkpoint, CheckpointError
from server.cli import main as server_main
from server.coordinator import Coordinator
from server.round_log import RoundLog
from server.strategy import load_state_dict, make_strategy, state_dict
from server.workflow import ResumableWorkflow
from simulations.cli import main

SHAPES = [(3, 4), (4,)]


def no_evaluation(server_round, weights, config):
    return 0.0, {}


class Proxy:
    def __init__(self, cid: str):
        self.cid = cid


def replies(server_round: int) -> list:
    """Two institutions' updates for a round: fixed, different per round and institution."""
    rng = np.random.default_rng(server_round)
    return [
        (Proxy(name), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [rng.uniform(-1, 1, shape).astype(np.float32) for shape in SHAPES]), 100, {m.INSTITUTION: name}))
        for name in ("st-mary", "st-john")
    ]


def fedadam(initial):
    job = load_config(overrides={"federation.strategy": "fedadam", "federation.institutions": 2,
                                 "secure_aggregation.enabled": False})
    return make_strategy(job, ndarrays_to_parameters(initial), no_evaluation)


def run_rounds(strategy, rounds):
    weights = None
    for rnd in rounds:
        parameters, _ = strategy.aggregate_fit(rnd, replies(rnd), [])
        weights = parameters_to_ndarrays(parameters)
    return weights


def test_a_fedadam_job_resumed_after_round_k_makes_the_same_next_update_as_the_uninterrupted_one(tmp_path):
    initial = [np.zeros(shape, dtype=np.float32) for shape in SHAPES]
    k = 3
    uninterrupted = fedadam(initial)
    after_k = run_rounds(uninterrupted, range(1, k + 1))
    # The coordinator dies here; its checkpoint goes through the file format.
    checkpoint.save(tmp_path, Checkpoint("job-0123456789abcdef", k, "{}", after_k, state_dict(uninterrupted), {}, {}))
    saved = checkpoint.latest(tmp_path)
    assert saved.server_round == k and all(np.array_equal(a, b) for a, b in zip(saved.weights, after_k))
    resumed = fedadam(saved.weights)
    load_state_dict(resumed, saved.strategy)

    expected = run_rounds(uninterrupted, [k + 1])
    got = run_rounds(resumed, [k + 1])
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    # The moments are what made it equal: a FedAdam restarted from the weights alone steps elsewhere.
    weights_only = run_rounds(fedadam(saved.weights), [k + 1])
    assert not all(np.allclose(a, b) for a, b in zip(weights_only, expected))


def test_institution_dp_round_count_survives_a_checkpoint():
    job = load_config(overrides={"institution_dp.enabled": True, "federation.institutions": 2})
    initial = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])
    strategy = make_strategy(job, initial, no_evaluation)
    strategy.noised_rounds = 5
    fresh = make_strategy(job, initial, no_evaluation)
    load_state_dict(fresh, state_dict(strategy))
    assert fresh.noised_rounds == 5


def saved(rnd: int) -> Checkpoint:
    weights = [np.full((2, 2), rnd, dtype=np.float32)]
    return Checkpoint("job-0123456789abcdef", rnd, "{}", weights, {"arrays": {}, "values": {}}, {}, {rnd: {"loss": 1.0}})


def test_a_torn_newest_checkpoint_is_never_loaded_the_previous_one_is(tmp_path):
    for rnd in (1, 2, 3):
        checkpoint.save(tmp_path, saved(rnd))
    files = sorted((tmp_path / "checkpoints").iterdir())
    assert [f.name for f in files] == ["round-00002.ckpt", "round-00003.ckpt"]  # the newest two are kept
    newest = files[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a kill during the write, or a torn copy
    assert checkpoint.latest(tmp_path).server_round == 2
    newest.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit: same length, wrong checksum
    assert checkpoint.latest(tmp_path).server_round == 2
    newest.write_bytes(data)
    assert checkpoint.latest(tmp_path).server_round == 3


def test_no_verifying_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """A folder whose checkpoints are all torn must not silently start the job again from round 0."""
    path = checkpoint.save(tmp_path, saved(1))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        checkpoint.latest(tmp_path)
    assert checkpoint.latest(tmp_path / "elsewhere") is None


def test_round_log_survives_the_json_of_a_checkpoint(tmp_path):
    log = RoundLog(node_names={7: "st-mary"})
    log.count(1, 7, down=10, up=20)
    log.replies[1] = {"st-mary": {m.EPSILON: 0.5, m.STEPS: 3}}
    log.declined[2] = {"st-john": "budget-spent"}
    log.reject(2, "aggregate", "sum-out-of-range")
    checkpoint.save(tmp_path, Checkpoint("job-0123456789abcdef", 2, "{}", [], {"arrays": {}, "values": {}},
                                         checkpoint.round_log_to_dict(log), {}))
    assert checkpoint.round_log_from_dict(checkpoint.latest(tmp_path).round_log) == log


def test_a_run_folder_belongs_to_one_job(tmp_path):
    first = checkpoint.claim_run_folder(tmp_path, "job-0123456789abcdef", "{}", {"after_round": 0})
    again = checkpoint.claim_run_folder(tmp_path, "job-0123456789abcdef", "{}", {"after_round": 2})
    assert [s["after_round"] for s in again] == [0, 2] and len(first) == 1
    with pytest.raises(CheckpointError, match="belongs to job job-0123456789abcdef"):
        checkpoint.claim_run_folder(tmp_path, "job-fedcba9876543210", "{}", {"after_round": 0})



def reply(name: str, steps: int, total: int, eps: float) -> dict:
    return {m.INSTITUTION: name, m.ACCOUNTANT: "prv", m.RECORDS: 200, m.EPSILON: eps, m.DATASET_EPSILON: eps,
            m.BUDGET_EPSILON: 8.0, m.GRANT_EPSILON: 8.0, m.DELTA: 1e-5, m.NOISE_MULTIPLIER: 1.1, m.SAMPLE_RATE: 0.2,
            m.STEPS: steps, m.TOTAL_STEPS: total, m.MAX_GRAD_NORM: 1.0, m.TRAIN_SECONDS: 1}


def test_reports_name_the_round_lost_in_a_crash_and_a_voided_round_with_what_each_institution_spent(tmp_path):
    log = RoundLog(node_names={1: "st-mary", 2: "st-john"})
    log.replies[1] = {"st-mary": reply("st-mary", 5, 5, 1.0), "st-john": reply("st-john", 5, 5, 1.0)}
    # Round 2 was released by st-mary only, then the coordinator died; the resumed round 2 shows it.
    log.replies[2] = {"st-mary": reply("st-mary", 5, 15, 2.5), "st-john": reply("st-john", 5, 10, 2.0)}
    log.replies[3] = {"st-mary": reply("st-mary", 5, 20, 3.0)}
    log.dropped[3] = {"st-john": "went offline"}
    sessions = [{"after_round": 0, "started": "t0", "run_id": "1", "asked": []},
                {"after_round": 1, "started": "t1", "run_id": "2", "asked": ["st-john", "st-mary"]}]
    assert report.lost_rounds(log, sessions) == [
        {"round": 2, "crashes": 1, "asked": ["st-john", "st-mary"], "released_steps": {"st-mary": 5},
         "retrained_by": ["st-john", "st-mary"], "declined_retry": {}}]
    job = load_config(overrides={"federation.institutions": 2, "federation.rounds": 3})
    evaluations = {r: {"loss": 1.0, "accuracy": 0.5} for r in range(4)}
    metrics = report.build_metrics(job, evaluations, log, {"job_id": "job-0123456789abcdef", "sessions": sessions,
                                                           "voided_rounds": [3], "deployed": True})
    assert metrics["job_id"] == "job-0123456789abcdef"
    report.write_report(tmp_path, metrics)
    privacy = (tmp_path / "privacy.md").read_text()
    assert ("- Round 2: released by st-mary (5 DP-SGD steps); asked of st-john (what they released for it, reported "
            "by no later update, is in their ledgers), lost in the coordinator crash; the job resumed from the "
            "checkpoint of round 1.") in privacy
    assert "- Round 3: voided after st-john dropped out" in privacy
    assert ("released by st-mary (5 DP-SGD steps; its job epsilon rose from 2.5000 to 3.0000 with it): it bought "
            "nothing, and every ledger counts what was released for it; st-john reported no release for it") in privacy
    markdown = (tmp_path / "report.md").read_text()
    assert "Dirichlet" not in markdown and "train.csv" not in markdown  # a deployed job: what the coordinator knows
    assert "st-john 200, st-mary 200" in markdown and "Interrupted (coordinator crash) after" in markdown

def test_a_voided_round_says_what_a_dropout_released_as_its_next_update_reveals(tmp_path):
    log = RoundLog(node_names={1: "st-mary", 2: "st-john"})
    log.replies[1] = {"st-mary": reply("st-mary", 5, 5, 1.0), "st-john": reply("st-john", 5, 5, 1.0)}
    log.replies[2] = {"st-mary": reply("st-mary", 5, 10, 2.0)}  # st-john released 4 steps, then dropped out
    log.dropped[2] = {"st-john": "its training process died"}
    log.replies[3] = {"st-mary": reply("st-mary", 5, 15, 3.0), "st-john": reply("st-john", 5, 14, 2.5)}
    assert report.voided_round(log, 2) == {
        "round": 2, "dropped": {"st-john": "its training process died"}, "released_steps": {"st-john": 4},
        "spent": {"st-mary": {"steps": 5, "epsilon_before": 1.0, "epsilon_after": 2.0}}}
    log.replies[3]["st-john"] = reply("st-john", 5, 10, 2.0)  # ... or released nothing for round 2
    line = report.voided_line(report.voided_round(log, 2))
    assert "st-john released nothing for it (the step count of its next update shows)" in line
    assert "its job epsilon rose from 1.0000 to 2.0000" in line


def test_a_lost_last_round_the_institutions_cannot_pay_again_is_reported_lost_and_the_job_finished(
        tmp_path, monkeypatch, capsys):
    """The coordinator died after both released round 2 of 2; the resumed job asks again, and both decline: the
    noise plan they keep for the job had charged the lost release. The report says so; the job is finished."""
    log = RoundLog(node_names={1: "st-mary", 2: "st-john"})
    log.replies[1] = {"st-mary": reply("st-mary", 5, 5, 1.0), "st-john": reply("st-john", 5, 5, 1.0)}
    log.declined[2] = {"st-mary": m.Reason.BUDGET_SPENT.value, "st-john": m.Reason.BUDGET_SPENT.value}
    sessions = [{"after_round": 0, "started": "t0", "run_id": "1", "asked": []},
                {"after_round": 1, "started": "t1", "run_id": "2", "asked": ["st-john", "st-mary"]}]
    job = load_config(overrides={"federation.institutions": 2, "federation.rounds": 2})
    evaluations = {r: {"loss": 1.0, "accuracy": 0.5} for r in range(3)}
    out = tmp_path / "run"
    out.mkdir()
    job_id = "job-0123456789abcdef"
    for session in sessions:
        checkpoint.claim_run_folder(out, job_id, job.to_json(), session)
    report.write_report(out, report.build_metrics(job, evaluations, log, {"job_id": job_id, "sessions": sessions,
                                                                          "deployed": True}))
    (lost,) = json.loads((out / "privacy.json").read_text())["lost_rounds"]
    assert lost == {"round": 2, "crashes": 1, "asked": ["st-john", "st-mary"], "released_steps": {}, "last": True,
                    "retrained_by": [], "declined_retry": {"st-mary": "budget-spent", "st-john": "budget-spent"}}
    assert ("- Round 2: asked of st-john and st-mary (what they released for it, reported by no later update, is in "
            "their ledgers), lost in the coordinator crash; the job resumed from the checkpoint of round 1. Every "
            "ledger counts what was released for it, and the epsilon figures above include what the institutions "
            "reported. Retried after the resume, it was declined by st-mary and st-john: no budget remained in their "
            "grant to train it again (the noise plan they keep for the job had charged the lost release), so the "
            "round stays lost and the global model after it is the one of round 1 (it was the job's last round: the "
            "job ended with that model).") in (out / "privacy.md").read_text()

    # status and export: the resumed run finished the job (completed); the crashed one was resumed, not failed.
    state = tmp_path / "state"
    state.mkdir()
    (state / "runs.json").write_text(json.dumps({
        "1": {"out": str(out), "job_id": job_id, "rounds": 2, "interrupted": "t"},
        "2": {"out": str(out), "job_id": job_id, "rounds": 2, "resumes": "1"}}))
    checkpoint.save(out, Checkpoint(job_id=job_id, server_round=2, job_json=job.to_json(), weights=[np.zeros(2)],
                                    strategy={}, round_log={}, evaluations={}))
    flower = [{"run-id": 1, "status": "finished:stopped", "elapsed": 9.0, "fab-hash": "ab" * 32, "status-details": ""},
              {"run-id": 2, "status": "finished:completed", "elapsed": 9.0, "fab-hash": "ab" * 32,
               "status-details": ""}]
    monkeypatch.setattr(Coordinator, "flwr", lambda self, *args, **kw: {"runs": flower, "success": True})
    assert Coordinator(state).job_state("2")["state"] == "completed" and Coordinator(state).to_resume() == []
    assert server_main(["status", "--state-dir", str(state)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "resumed as 2" in rows["1"] and "completed" in rows["2"] and "2/2" in rows["2"]
    assert server_main(["export", "2", "--to", str(tmp_path / "copy"), "--state-dir", str(state)]) == 0
    assert (tmp_path / "copy" / "privacy.md").is_file()


# -- a simulated job killed and resumed -----------------------------------------------------------

def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (Ray's GCS, raylet and workers included)."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"


def released_rounds(state: Path) -> dict[str, list[int]]:
    rounds = {}
    for name in ("institution-1", "institution-2"):
        path = state / name / LEDGER_FILE
        rounds[name] = [r.round for r in PrivacyLedger(path).releases(name)] if path.is_file() else []
    return rounds


def test_a_simulation_killed_after_round_k_resumes_where_it_stopped_and_pays_nothing_twice(
        banking_slice, tmp_path, monkeypatch):
    train, test = banking_slice
    out, rounds = tmp_path / "run", 3
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "--train", str(train), "--test", str(test), "--institutions", "2",
         "--rounds", str(rounds), "--batch-size", "48", "--epsilon", "8", "--out", str(out)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    # Kill it once both institutions have released round 2 (or, if that round was quicker, once it is saved).
    deadline = time.monotonic() + 300
    while True:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "round 2 never started"
        released = released_rounds(out / "institutions")
        if all(2 in r for r in released.values()) or (out / "checkpoints" / "round-00002.ckpt").exists():
            break
        time.sleep(0.02)
    kill_tree(first.pid)
    log.close()
    saved = checkpoint.latest(out)
    k = saved.server_round
    assert 1 <= k < rounds and not (out / "metrics.json").exists()
    assert json.loads((out / "privacy.json").read_text())["rounds_completed"] == k  # what was spent is on record

    loaded = []

    class Observed(ResumableWorkflow):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaded.append((self.first_round, self.weights.to_numpy_ndarrays()))

    monkeypatch.setattr("server.app.ResumableWorkflow", Observed)
    assert main(["--resume", str(out)]) == 0

    (first_round, weights), = loaded
    assert first_round == k + 1
    assert all(np.array_equal(a, b) for a, b in zip(weights, saved.weights))  # the round-k weights, as saved
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(rounds + 1))  # 0..n, each once
    assert metrics["job_id"] == saved.job_id and [s["after_round"] for s in metrics["sessions"]] == [0, k]
    report = json.loads((out / "privacy.json").read_text())
    for inst in metrics["institutions"]:
        ledger = PrivacyLedger(out / "institutions" / inst["name"] / LEDGER_FILE)
        dataset = inst["name"]
        assert list(ledger.grants(dataset)) == [saved.job_id]  # one job, one grant, one noise plan
        history = ledger.history(dataset)
        spent = epsilon(history, 1e-5, "prv")
        assert ledger.spent(dataset) == pytest.approx(spent, rel=1e-9) and spent <= 8.0 + 1e-9
        assert inst["dataset_epsilon"] == pytest.approx(spent, rel=1e-6)  # the report counts the lost release too
        declined = set(inst["declined_rounds"])  # a lost round's release can leave the last round no step
        assert sorted(set(r.round for r in ledger.releases(dataset))) == [
            r for r in range(1, rounds + 1) if r not in declined]
    assert main(["--resume", str(out)]) == 2  # a finished job is not resumed again
    lost_in_ledgers = {name: rounds_.count(k + 1) - 1 for name, rounds_ in released_rounds(out / "institutions").items()}
    if any(lost_in_ledgers.values()):
        (lost,) = report["lost_rounds"]
        assert lost["round"] == k + 1
        assert {name for name, steps in lost["released_steps"].items() if steps > 0} == {
            name for name, extra in lost_in_ledgers.items() if extra}
        assert f"Round {k + 1}: released by institution-" in (out / "privacy.md").read_text()


def test_sim_resume_continues_the_job_as_it_was_or_says_why_not(tmp_path, capsys):
    assert main(["--resume", str(tmp_path)]) == 2
    assert "not the run folder of a fedtune-sim job" in capsys.readouterr().out
    assert main(["--resume", str(tmp_path), "--rounds", "3"]) == 2  # another job under the same id: refused
    assert "--resume continues the job as it was; drop --rounds" in capsys.readouterr().out
