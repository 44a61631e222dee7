import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from common.config import load_config
from server.round_log import DECLINED_REASON
from server.strategy import (
    ClippedUpdatesOnly,
    make_strategy,
    make_workflow,
    quantization_range,
)

INITIAL = ndarrays_to_parameters([np.zeros(3, dtype=np.float32)])


def no_evaluation(server_round, weights, config):
    return 0.0, {}


def test_each_strategy_name_gives_that_flower_strategy_with_every_institution_each_round():
    for name, flower_class in (("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)):
        job = load_config(overrides={"federation.strategy": name, "federation.institutions": 3})
        strategy = make_strategy(job, INITIAL, no_evaluation)
        assert isinstance(strategy, flower_class)
        assert strategy.min_fit_clients == strategy.min_available_clients == 3
        assert strategy.fraction_fit == 1.0 and strategy.fraction_evaluate == 0.0
    fedprox = load_config(overrides={"federation.strategy": "fedprox", "federation.proximal_mu": 0.3})
    assert make_strategy(fedprox, INITIAL, no_evaluation).proximal_mu == 0.3


def test_institution_dp_wraps_fedavg_in_flowers_client_side_clipping_wrapper():
    job = load_config(overrides={"institution_dp.enabled": True, "institution_dp.clipping_norm": 0.7,
                                 "federation.institutions": 3})
    strategy = make_strategy(job, INITIAL, no_evaluation)
    assert isinstance(strategy, ClippedUpdatesOnly) and isinstance(strategy.strategy, FedAvg)
    assert strategy.clipping_norm == 0.7 and strategy.num_sampled_clients == 3


def test_secure_aggregation_is_on_by_default_and_off_only_when_asked():
    assert isinstance(make_workflow(load_config()).fit_workflow, SecAggPlusWorkflow)
    off = load_config(overrides={"secure_aggregation.enabled": False})
    assert make_workflow(off).fit_workflow is default_fit_workflow


def test_quantised_sum_of_every_institution_fits_the_modulus():
    for institutions in (2, 3, 4, 7, 8, 100, 1000):
        assert institutions * quantization_range(institutions) <= 2**32
        assert quantization_range(institutions) <= 2**30  # Flower's stochastic rounding casts to int32
        assert 2 * institutions * quantization_range(institutions) > 2**32 or quantization_range(institutions) == 2**30


def test_a_declined_round_is_recognised_in_flowers_error_text():
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'fedtune-declined[st-mary]: round 4 "
              "declined: data set budget epsilon 8 is spent (7.990 at delta 1e-06)'>")
    name, why = DECLINED_REASON.search(reason).groups()
    assert name == "st-mary"
    assert why == "round 4 declined: data set budget epsilon 8 is spent (7.990 at delta 1e-06)"
    assert DECLINED_REASON.search("<class 'KeyError'>:<'job'>") is None


def test_message_bytes_are_counted_with_the_empty_lists_secagg_sends():
    """Regression: flwr 1.39's ConfigRecord.count_bytes raises IndexError on an empty list."""
    from flwr.app import ConfigRecord, RecordDict

    from server.round_log import content_bytes

    content = RecordDict({"secaggplus_configs": ConfigRecord({"dead": [], "stage": "unmask", "ids": [1, 2]})})
    assert content_bytes(content) == len("dead") + len("stage") + len("unmask") + len("ids") + 16
