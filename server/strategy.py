"""How a job's rounds run: one of Flower's strategies inside Flower's workflow, SecAgg+ by default.

Flower 1.39's SecAgg+ works only with the legacy fit workflow (`DefaultWorkflow` +
`SecAggPlusWorkflow` on the coordinator, `secaggplus_mod` on the institution), so every job runs on
that workflow, with or without secure aggregation: one code path for simulation and deployment.
With SecAgg+ the coordinator only ever holds the sum of the institutions' masked updates.

Institution-level DP (`[institution_dp]`) wraps the strategy in Flower's
`DifferentialPrivacyClientSideFixedClipping`; `ClippedUpdatesOnly` refuses any round in which an
institution did not report clipping its update to the bound the noise was calibrated for, since
Flower's wrapper would otherwise add noise to unclipped updates without a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from flwr.common import NDArrays, Parameters, Scalar
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedProx, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from common import messages as m
from common.config import JobConfig
from server.round_log import InstitutionFailed

# SecAgg+ sums quantised values modulo 2**32; each institution's must stay below 2**32 / institutions,
# and Flower's stochastic rounding casts to int32.
MODULUS = 2**32
MAX_QUANTIZATION = 2**30

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]]]


class ClippedUpdatesOnly(DifferentialPrivacyClientSideFixedClipping):
    """Flower's central-DP wrapper that adds noise only to updates clipped by the institutions."""

    noised_rounds: int = 0

    def aggregate_fit(self, server_round, results, failures):
        for _, fit_res in results:
            name = fit_res.metrics.get(m.INSTITUTION, "an institution")
            if fit_res.metrics.get(m.CLIPPED_TO) != self.clipping_norm or fit_res.num_examples != 1:
                raise InstitutionFailed(
                    f"round {server_round}: {name} did not clip its update to {self.clipping_norm} with unit "
                    "weight; institution-level noise would not protect it"
                )
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.noised_rounds += 1
        return parameters, metrics


def make_strategy(job: JobConfig, initial: Parameters, evaluate_fn: EvaluateFn) -> Strategy:
    """Every institution trains in every round; the coordinator evaluates centrally."""
    fed = job.federation
    common = dict(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=fed.institutions,
        min_evaluate_clients=0,
        min_available_clients=fed.institutions,
        initial_parameters=initial,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {
            m.SERVER_ROUND: server_round,
            m.MAX_WEIGHT: job.secure_aggregation.max_weight,
        },
        # Per-institution metrics are kept by server.round_log, not averaged.
        fit_metrics_aggregation_fn=lambda results: {},
    )
    strategy: Strategy = {
        "fedavg": lambda: FedAvg(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=fed.proximal_mu),
        "fedadam": lambda: FedAdam(**common, eta=fed.server_learning_rate, eta_l=job.training.learning_rate),
    }[fed.strategy]()
    dp = job.institution_dp
    if dp.enabled:
        strategy = ClippedUpdatesOnly(strategy, dp.noise_multiplier, dp.clipping_norm, fed.institutions)
    return strategy


def quantization_range(institutions: int) -> int:
    """The finest SecAgg+ quantisation whose sum over all institutions cannot wrap around."""
    return min(MAX_QUANTIZATION, 2 ** int(math.log2(MODULUS // institutions)))


def make_workflow(job: JobConfig) -> DefaultWorkflow:
    secagg = job.secure_aggregation
    if not secagg.enabled:
        return DefaultWorkflow(fit_workflow=default_fit_workflow)
    return DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every institution holds a share of every other's key
            reconstruction_threshold=secagg.reconstruction_threshold,
            max_weight=float(secagg.max_weight),
            clipping_range=secagg.clipping_range,
            quantization_range=quantization_range(job.federation.institutions),
            modulus_range=MODULUS,
            timeout=job.federation.round_timeout,
        )
    )
