from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common.config import load_config
from server.strategy import DECLINED_REASON, RoundLog, make_strategy


def test_each_strategy_name_gives_that_flower_strategy_with_every_institution_each_round():
    for name, flower_class in (("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)):
        job = load_config(overrides={"federation.strategy": name, "federation.institutions": 3})
        strategy = make_strategy(job, RoundLog())
        assert isinstance(strategy, flower_class)
        assert strategy.min_train_nodes == strategy.min_available_nodes == 3
        assert strategy.fraction_train == 1.0
    assert make_strategy(load_config(overrides={"federation.strategy": "fedprox", "federation.proximal_mu": 0.3}),
                         RoundLog()).proximal_mu == 0.3


def test_a_declined_round_is_recognised_in_flowers_error_text():
    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'fedtune-declined[st-mary]: round 4 "
              "declined: data set budget epsilon 8 is spent (7.990 at delta 1e-06)'>")
    name, why = DECLINED_REASON.search(reason).groups()
    assert name == "st-mary"
    assert why == "round 4 declined: data set budget epsilon 8 is spent (7.990 at delta 1e-06)"
    assert DECLINED_REASON.search("<class 'KeyError'>:<'job'>") is None
