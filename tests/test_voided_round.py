"""A round SecAgg+ voids: one of two institutions drops out mid-round, real processes over TLS.

With two institutions and SecAgg+ the sum of a round can be unmasked only if both send their
masked update (threshold 2). The test SIGKILLs alpha's ClientApp while it trains round 1
(tests/test_daemon_kill.py's machinery): Flower answers alpha's message with an error once its
task token expires, beta's masked update is in, and Flower's SecAgg+ workflow halts
(`Insufficient available nodes`). The global model must stay as it was, the privacy report must
name round 1 as voided with what each institution spent on it (as its own ledger says), and the
job must go on to round 2 with both institutions and finish within every budget. Every wait has
a deadline.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from client.privacy.ledger import PrivacyLedger
from common.accounting import epsilon
from common.config import ModelConfig
from common.models.kinds import model_kind
from common.models.transport import to_ndarrays, trainable_state
from common.progress import Follower
from deployment_support import tail, write_job
from server import checkpoint
from server.run_folder import CHECKPOINT_DIR
from test_daemon_kill import Kill, clientapps, current_nodes, kill_when, wait_online, wait_settled

pytestmark = pytest.mark.timeout(600)

ROUND_TIMEOUT = 90.0  # above the killed ClientApp's error (up to 60 s after its last heartbeat) and a normal reply
LOCAL_EPOCHS = 8  # a second or more of training for the kill to land in


def job_releases(ledger: PrivacyLedger, job_id: str) -> list:
    return [r for r in ledger.releases(ledger.datasets()[0].id) if r.job == job_id]


def initial_weights(metrics: dict, labels: list[str]) -> list[np.ndarray]:
    """The global weights before round 1, built as the coordinator builds them (same model, same seed)."""
    config = ModelConfig.model_validate(metrics["config"]["model"])
    model = model_kind(config).build_model(config, labels, torch.device("cpu"), seed=metrics["config"]["federation"]["seed"])
    return to_ndarrays(trainable_state(model))


def test_a_dropout_voids_a_secagg_round_the_model_stays_and_the_report_says_what_each_spent(
        coordinator, federation, banking_slice, slice_labels, env, tmp_path):
    nodes = current_nodes(federation)
    job_file = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels,
                         federation={"rounds": 2, "round_timeout": ROUND_TIMEOUT},
                         training={"local_epochs": LOCAL_EPOCHS}, secure_aggregation={"enabled": True})
    out = tmp_path / "run"
    alpha = nodes["alpha"]
    progress = Follower(alpha.state / "progress.jsonl")
    list(progress.new_events())  # only this job's steps count
    before = set(clientapps(alpha))
    kill = Kill("alpha", 1, "training", 0.0)
    with ThreadPoolExecutor(max_workers=2) as pool:
        submitted = pool.submit(coordinator.run, "submit", job_file, "--out", out, timeout=540)
        killer = pool.submit(kill_when, alpha, kill, progress, before)
        result = submitted.result()
        killer.result()
    context = f"kill: {kill}\n{result.stdout[-4000:]}\n{result.stderr}\n{tail(alpha.log)}"
    assert kill.landed == "hit", context
    assert result.returncode == 0, context
    assert "Insufficient available nodes" in result.stdout and "Secure aggregation halted" in result.stdout, context
    run_id = re.search(r"submitted run (\d+)", result.stdout).group(1)
    job_id = json.loads((coordinator.state / "runs.json").read_text())[run_id]["job_id"]

    # The global model after the voided round is the one before it; round 2 moved it.
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    saved = {rnd: checkpoint.decode((out / CHECKPOINT_DIR / f"round-{rnd:05d}.ckpt").read_bytes()).weights
             for rnd in (1, 2)}
    for start, after_void in zip(initial_weights(metrics, slice_labels), saved[1], strict=True):
        np.testing.assert_array_equal(start, after_void)
    assert any(not np.array_equal(a, b) for a, b in zip(saved[1], saved[2]))
    assert metrics["rounds"][1]["loss"] == metrics["rounds"][0]["loss"]
    assert sorted(metrics["rounds"][2]["took_part"]) == ["alpha", "beta"], context

    # The report names round 1 as voided, with what each institution's ledger says it spent on it.
    for node in nodes.values():
        wait_settled(node)
        wait_online(coordinator, node)
    ledgers = {name: PrivacyLedger(node.ledger) for name, node in nodes.items()}
    privacy = json.loads((out / "privacy.json").read_text())
    (voided,) = privacy["voided"]
    assert voided["round"] == 1 and list(voided["dropped"]) == ["alpha"], voided
    beta_ledger = ledgers["beta"]
    dataset = beta_ledger.datasets()[0]
    [beta_release] = [r for r in job_releases(beta_ledger, job_id) if r.round == 1]
    history = [(r.noise_multiplier, r.sample_rate, r.steps) for r in job_releases(beta_ledger, job_id) if r.round <= 1]
    assert voided["spent"] == {"beta": {
        "steps": beta_release.steps, "epsilon_before": 0.0,
        "epsilon_after": pytest.approx(epsilon(history, dataset.budget.delta, dataset.budget.accountant), rel=1e-9)}}
    alpha_released = sum(r.steps for r in job_releases(ledgers["alpha"], job_id) if r.round == 1)
    assert voided["released_steps"] == {"alpha": alpha_released}, voided  # as its round-2 update revealed
    text = (out / "privacy.md").read_text()
    assert "- Round 1: voided after alpha dropped out" in text and "it bought nothing" in text
    assert ("alpha released nothing for it" in text) == (alpha_released == 0)
    assert f"beta ({beta_release.steps} DP-SGD steps; its job epsilon rose from 0.0000 to " in text

    for name, ledger in ledgers.items():
        dataset = ledger.datasets()[0]
        assert ledger.spent(dataset.id) == epsilon(ledger.history(dataset.id), dataset.budget.delta,
                                                   dataset.budget.accountant) <= dataset.budget.epsilon
        assert ledger.spent(dataset.id, job_id) <= ledger.grant(dataset.id, job_id).granted + 1e-9
        assert [r.round for r in job_releases(ledger, job_id)] == ([2] if name == "alpha" and not alpha_released
                                                                     else [1, 2])
