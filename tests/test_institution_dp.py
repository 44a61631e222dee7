"""Institution-level DP: clipping at the institution, noise at the coordinator, never one without the other."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.task_identity import TaskIdentity

from client.app import institution_clipping_mod
from common import messages as m
from common.accounting import epsilon, institution_epsilon
from common.config import ConfigError, load_config
from server.round_log import InstitutionFailed
from server.strategy import ClippedUpdatesOnly
from simulations.cli import main as fedtune_sim

GLOBAL = [np.zeros(50), np.zeros((4, 5))]


@pytest.fixture(autouse=True)
def flower_task():
    """Flower stamps every Message with the task it runs in; out of a run, say which."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def instruction(config: dict) -> Message:
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(GLOBAL), config), keep_input=True)
    return Message(content, dst_node_id=1, message_type="train")


def trained(msg: Message, context: Context) -> Message:
    """An institution whose update is far larger than any sane clipping bound."""
    update = [np.full(50, 3.0), np.full((4, 5), -3.0)]
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {m.INSTITUTION: "alpha"})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_institution_clips_its_update_and_says_so_when_the_coordinator_adds_noise():
    reply = institution_clipping_mod(instruction({KEY_CLIPPING_NORM: 0.5}), context(), trained)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    update = np.concatenate([a.ravel() for a in parameters_to_ndarrays(res.parameters)])
    assert np.linalg.norm(update) == pytest.approx(0.5)
    assert res.metrics[m.CLIPPED_TO] == 0.5


def test_without_institution_dp_the_update_is_untouched_and_carries_no_receipt():
    reply = institution_clipping_mod(instruction({}), context(), trained)
    res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert parameters_to_ndarrays(res.parameters)[0][0] == 3.0
    assert m.CLIPPED_TO not in res.metrics


def fit_result(metrics: dict, weight: int = 1):
    return (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.zeros(20_000)]), weight, metrics))


def test_coordinator_refuses_to_noise_an_update_nobody_clipped():
    """Flower's wrapper alone would run without clipping if the institution lacks fixedclipping_mod."""
    strategy = ClippedUpdatesOnly(FedAvg(), noise_multiplier=1.0, clipping_norm=0.5, num_sampled_clients=2)
    clipped = fit_result({m.INSTITUTION: "alpha", m.CLIPPED_TO: 0.5})
    for unclipped in (fit_result({m.INSTITUTION: "beta"}), fit_result({m.INSTITUTION: "beta", m.CLIPPED_TO: 5.0}),
                      fit_result({m.INSTITUTION: "beta", m.CLIPPED_TO: 0.5}, weight=300)):
        with pytest.raises(InstitutionFailed, match="beta did not clip"):
            strategy.aggregate_fit(1, [clipped, unclipped], [])
    assert strategy.noised_rounds == 0


def test_coordinator_adds_noise_of_the_calibrated_size():
    strategy = ClippedUpdatesOnly(FedAvg(), noise_multiplier=2.0, clipping_norm=0.5, num_sampled_clients=2)
    results = [fit_result({m.INSTITUTION: name, m.CLIPPED_TO: 0.5}) for name in ("alpha", "beta")]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    (noised,) = parameters_to_ndarrays(parameters)
    assert noised.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.05)  # std = noise_multiplier * C / n
    assert strategy.noised_rounds == 1


def test_institution_epsilon_is_the_gaussian_mechanism_composed_over_rounds():
    assert institution_epsilon(1.0, 0, 1e-3) == 0.0
    assert institution_epsilon(1.0, 10, 1e-3) == pytest.approx(epsilon([(1.0, 1.0, 10)], 1e-3, "rdp"))
    assert institution_epsilon(1.0, 5, 1e-3) < institution_epsilon(1.0, 10, 1e-3)


def test_institution_dp_needs_plain_fedavg():
    with pytest.raises(ConfigError, match="institution_dp needs federation.strategy = 'fedavg'"):
        load_config(overrides={"institution_dp.enabled": True, "federation.strategy": "fedadam"})


def test_simulated_job_with_institution_dp_reports_both_guarantees(banking_slice, tmp_path):
    train, test = banking_slice
    job = tmp_path / "job.toml"
    job.write_text("[institution_dp]\nenabled = true\nnoise_multiplier = 0.8\nclipping_norm = 0.5\n")
    code = fedtune_sim(["--config", str(job), "--train", str(train), "--test", str(test), "--institutions", "2",
                        "--rounds", "1", "--batch-size", "48", "--out", str(tmp_path / "run")])
    assert code == 0
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    dp = report["institution_level_dp"]
    assert dp["enabled"] and dp["rounds"] == 1 and dp["accountant"] == "rdp"
    assert dp["epsilon"] == pytest.approx(institution_epsilon(0.8, 1, 1e-3))
    assert report["secure_aggregation"] is True
    assert all(inst["rounds"] == 1 and inst["epsilon"] > 0 for inst in report["institutions"])
    assert "Institution-level DP at the coordinator: on" in (tmp_path / "run" / "privacy.md").read_text()
