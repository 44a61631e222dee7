"""Federations of every size: the batch that follows an institution's size, client sampling, SecAgg+'s neighbourhood.

Pure tests (no network, no model): the rules and the exactness of the noise plan they feed.
"""

from collections import Counter
from pathlib import Path

import pytest
import torch
from flwr.server.compat.grid_client_proxy import GridClientProxy
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.budget import set_budget
from client.privacy.grant import Request, allowance, grant_for
from client.privacy.ledger import PrivacyLedger
from common.accounting import compact, epsilon, expected_batch, sample_rate
from common.config import ConfigError, load_config
from server.strategy import LeastAskedFirst, make_workflow, quantization_range, secagg_shares

SHA = "b" * 64


def test_the_expected_batch_is_the_sampling_rate_of_the_records_within_floor_and_cap():
    assert expected_batch(100, 0.5, 16, 1024) == 50
    assert expected_batch(101, 0.5, 16, 1024) == 51  # rounded up: Opacus then samples 1 / ceil(101 / 51) = 1/2
    assert expected_batch(20, 0.5, 16, 1024) == 16  # the floor: a tiny institution samples at a higher rate
    assert expected_batch(10, 0.5, 16, 1024) == 16 and sample_rate(10, 16) == 1.0  # above its records: rate 1
    assert expected_batch(50_000, 0.5, 16, 1024) == 1024  # the cap: a large one samples at a lower rate
    assert expected_batch(700, 0.5, 300, 300) == 300  # min = max: a fixed batch
    with pytest.raises(ValueError):
        expected_batch(0, 0.5, 16, 1024)


def test_the_default_rule_keeps_the_old_fixed_batch_for_institutions_of_2048_records_or_more():
    """The 4-institution default (2,067-2,798 records each) runs the mechanism it ran with batch 1024."""
    rule = Request.of(load_config())
    for records in (2048, 2067, 2798, 10_003):
        assert sample_rate(records, rule.batch_size(records)) == sample_rate(records, 1024)
    assert sample_rate(100, rule.batch_size(100)) == 0.5  # where 1024 meant rate 1: no amplification


def test_a_fixed_batch_is_one_setting_and_the_bounds_are_checked():
    fixed = Request.of(load_config(overrides={"training.batch_size": 48}))
    assert [fixed.batch_size(n) for n in (10, 100, 5000)] == [48, 48, 48]
    with pytest.raises(ConfigError, match="min_batch"):
        load_config(overrides={"training.min_batch": 64, "training.max_batch": 32})


@pytest.mark.parametrize("records", [7, 33, 100, 101, 2067, 20_000])
def test_opacus_samples_at_the_planned_rate_for_every_size(records):
    batch = Request.of(load_config()).batch_size(records)
    loader = DataLoader(TensorDataset(torch.arange(records)), batch_size=batch)
    assert DPDataLoader.from_data_loader(loader).sample_rate == sample_rate(records, batch)


@pytest.mark.parametrize("records", [40, 20_000])
def test_the_plan_of_a_tiny_and_a_large_institution_is_exact_over_its_released_history(tmp_path, records):
    """What the ledger says was spent is the accountant over what it recorded, within grant and budget."""
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    set_budget(ledger, "bank", tmp_path / "bank.csv", SHA, epsilon_budget=8.0, delta=1e-5, accountant="prv")
    job = load_config(overrides={"federation.rounds": 5})
    grant = grant_for(ledger, "bank", "job", Request.of(job), records)
    plan = grant.plan
    assert plan.sample_rate == sample_rate(records, plan.batch_size) and plan.rounds == 5
    for rnd in range(1, 6):
        allowed = allowance(ledger, "bank", "job", grant)
        assert allowed.steps == plan.steps_per_round
        ledger.release(ledger.reserve("bank", "job", rnd, allowed.steps, plan.sample_rate, plan.noise_multiplier,
                                      1.0, SHA))
    history = ledger.history("bank")
    assert compact(history) == [(plan.noise_multiplier, plan.sample_rate, 5 * plan.steps_per_round)]
    assert ledger.spent("bank") == pytest.approx(epsilon(history, 1e-5, "prv"), rel=1e-9)
    assert 0.97 * 8.0 <= ledger.spent("bank") <= 8.0


def test_an_institution_plans_for_the_rounds_it_is_asked_to_take_part_in():
    job = load_config(overrides={"federation.institutions": 100, "federation.fraction_per_round": 0.15,
                                 "federation.rounds": 20})
    assert job.federation.per_round == 15 and job.federation.rounds_per_institution == 3
    assert Request.of(job).rounds == 3
    assert load_config().federation.rounds_per_institution == 20  # everyone, every round
    with pytest.raises(ConfigError, match="2 institutions per round"):
        load_config(overrides={"federation.institutions": 10, "federation.fraction_per_round": 0.1})


def _proxies(n: int) -> list[GridClientProxy]:
    return [GridClientProxy(node_id=node, grid=None, run_id=1) for node in range(1, n + 1)]


def test_least_asked_first_asks_nobody_more_than_the_rounds_its_noise_is_planned_for():
    job = load_config(overrides={"federation.institutions": 10, "federation.fraction_per_round": 0.3,
                                 "federation.rounds": 7})
    fed = job.federation
    manager = LeastAskedFirst()
    for proxy in _proxies(fed.institutions):
        manager.register(proxy)
    rounds = [manager.sample(fed.per_round) for _ in range(fed.rounds)]
    assert all(len({p.cid for p in asked}) == fed.per_round for asked in rounds)
    counts = Counter(p.cid for asked in rounds for p in asked)
    assert len(counts) == fed.institutions and max(counts.values()) == fed.rounds_per_institution == 3
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({tuple(sorted(p.cid for p in manager.sample(3))) for _ in range(20)}) > 1  # ties: at random


def test_secagg_neighbourhood_is_logarithmic_odd_and_only_where_it_halves_the_round():
    assert [secagg_shares(n) for n in (2, 4, 16, 32, 33)] == [1.0] * 5  # everyone, as before
    assert [secagg_shares(n) for n in (34, 64, 100, 1000)] == [17, 19, 21, 31]
    for n in range(34, 1001):
        shares = secagg_shares(n)
        assert shares % 2 == 1 and 2 * shares <= n
    # Flower's workflow accepts it with our quantisation range (it caps shares at modulus / range).
    job = load_config(overrides={"federation.institutions": 100})
    workflow = make_workflow(job).fit_workflow
    assert workflow.num_shares == 21 and workflow.quantization_range == quantization_range(100)


def test_the_report_states_what_the_neighbourhood_costs_in_privacy():
    from server.report import secagg_line, secagg_neighbours

    job = load_config(overrides={"federation.institutions": 100})
    hood = secagg_neighbours(job)
    assert hood == {"per_round": 100, "shares": 21, "threshold": 14, "threshold_if_all": 67}
    line = secagg_line({"secure_aggregation": True, "secure_aggregation_neighbours": hood})
    assert "20 neighbours of the 100" in line and "colluding with 14" in line and "67 of 99" in line
    small = secagg_neighbours(load_config())
    assert "neighbours" not in secagg_line({"secure_aggregation": True, "secure_aggregation_neighbours": small})


def test_every_strategy_asks_per_round_institutions_and_sizes_noise_and_checks_for_them():
    import numpy as np
    from flwr.common import ndarrays_to_parameters

    from server.strategy import make_strategy

    initial = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])
    for name in ("fedavg", "fedprox", "fedadam"):
        job = load_config(overrides={"federation.strategy": name, "federation.institutions": 10,
                                     "federation.fraction_per_round": 0.25})
        checked = make_strategy(job, initial, lambda *args: (0.0, {}))
        assert checked.strategy.num_fit_clients(10) == (3, 10)  # ceil(2.5): Flower alone would round down
        assert checked.bounds.institutions == 3 and checked.bounds.quantization_range == quantization_range(3)
    dp = load_config(overrides={"federation.institutions": 10, "federation.fraction_per_round": 0.25,
                                "institution_dp.enabled": True})
    assert make_strategy(dp, initial, lambda *args: (0.0, {})).num_sampled_clients == 3
