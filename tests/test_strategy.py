import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from common.config import load_config
from common.messages import MAX_WEIGHT
from server.round_log import RoundLog
from server.strategy import (
    ClippedUpdatesOnly,
    make_strategy,
    make_workflow,
    quantization_range,
)
from server.update_checks import CheckedUpdates

INITIAL = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])


def no_evaluation(server_round, weights, config):
    return 0.0, {}


def test_each_strategy_name_gives_that_flower_strategy_with_every_institution_each_round():
    for name, flower_class in (("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)):
        job = load_config(overrides={"federation.strategy": name, "federation.institutions": 3})
        checked = make_strategy(job, INITIAL, no_evaluation)
        assert isinstance(checked, CheckedUpdates)  # every job's updates are checked
        strategy = checked.strategy
        assert isinstance(strategy, flower_class)
        assert strategy.min_fit_clients == strategy.min_available_clients == 3
        assert strategy.fraction_fit == 1.0 and strategy.fraction_evaluate == 0.0
    fedprox = load_config(overrides={"federation.strategy": "fedprox", "federation.proximal_mu": 0.3})
    assert make_strategy(fedprox, INITIAL, no_evaluation).strategy.proximal_mu == 0.3


def test_institution_dp_wraps_the_checked_fedavg_in_flowers_client_side_clipping_wrapper():
    """Noise goes on after the checks: they see the average before the noise, and a rejected round is not noised."""
    job = load_config(overrides={"institution_dp.enabled": True, "institution_dp.clipping_norm": 0.7,
                                 "federation.institutions": 3})
    round_log = RoundLog()
    strategy = make_strategy(job, INITIAL, no_evaluation, round_log)
    assert isinstance(strategy, ClippedUpdatesOnly) and isinstance(strategy.strategy, CheckedUpdates)
    assert isinstance(strategy.strategy.strategy, FedAvg)
    assert strategy.strategy.round_log is round_log and strategy.strategy.void_round_on_rejection
    assert strategy.clipping_norm == 0.7 and strategy.num_sampled_clients == 3


def test_the_checks_know_the_job_bounds_and_whether_they_see_a_secagg_sum():
    job = load_config(overrides={"federation.institutions": 4, "secure_aggregation.clipping_range": 2.0,
                                 "secure_aggregation.max_weight": 500})
    bounds = make_strategy(job, INITIAL, no_evaluation).bounds
    assert bounds.shapes == ((3,),) and bounds.clipping_range == 2.0 and bounds.max_weight == 500
    assert bounds.quantization_range == quantization_range(4) == make_workflow(job).fit_workflow.quantization_range
    off = load_config(overrides={"secure_aggregation.enabled": False})
    assert make_strategy(off, INITIAL, no_evaluation).bounds.quantization_range is None


def test_under_institution_dp_secagg_quantises_the_unit_weights_exactly():
    """Every institution weighs 1 there: max_weight 1 makes each weight factor R, not R / max_weight rounded."""
    job = load_config(overrides={"institution_dp.enabled": True, "federation.institutions": 4})
    assert make_workflow(job).fit_workflow.max_weight == 1.0
    checked = make_strategy(job, INITIAL, no_evaluation).strategy
    assert checked.bounds.max_weight == 1.0
    assert checked.strategy.on_fit_config_fn(1)[MAX_WEIGHT] == 1  # what the institutions are told
    assert make_strategy(load_config(), INITIAL, no_evaluation).bounds.max_weight == 100_000


def test_secure_aggregation_is_on_by_default_and_off_only_when_asked():
    assert isinstance(make_workflow(load_config()).fit_workflow, SecAggPlusWorkflow)
    off = load_config(overrides={"secure_aggregation.enabled": False})
    assert make_workflow(off).fit_workflow is default_fit_workflow


def test_quantised_sum_of_every_institution_stays_below_the_modulus():
    """Each quantised value is at most R + 1 (tests/test_aggregation_checks.py sums them with Flower's quantiser)."""
    for institutions in (2, 3, 4, 7, 8, 100, 1000):
        assert institutions * (quantization_range(institutions) + 1) < 2**32
        assert quantization_range(institutions) + 1 <= 2**31 - 1  # Flower's stochastic rounding casts to int32


def test_message_bytes_are_counted_with_the_empty_lists_secagg_sends():
    """Regression: flwr 1.39's ConfigRecord.count_bytes raises IndexError on an empty list."""
    from flwr.app import ConfigRecord, RecordDict

    from server.round_log import content_bytes

    content = RecordDict({"secaggplus_configs": ConfigRecord({"dead": [], "stage": "unmask", "ids": [1, 2]})})
    assert content_bytes(content) == len("dead") + len("stage") + len("unmask") + len("ids") + 16
