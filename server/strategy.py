"""How a job's rounds run: one of Flower's strategies inside Flower's workflow, SecAgg+ by default.

Flower 1.39's SecAgg+ works only with the legacy fit workflow (`DefaultWorkflow` +
`SecAggPlusWorkflow` on the coordinator, `secaggplus_mod` on the institution), so every job runs on
that workflow, with or without secure aggregation: one code path for simulation and deployment.
With SecAgg+ the coordinator only ever holds the sum of the institutions' masked updates.

Institution-level DP (`[institution_dp]`) wraps the strategy in Flower's
`DifferentialPrivacyClientSideFixedClipping`; `ClippedUpdatesOnly` refuses any round in which an
institution did not report clipping its update to the bound the noise was calibrated for, since
Flower's wrapper would otherwise add noise to unclipped updates without a word.

Every job's strategy is wrapped in `CheckedUpdates` (server/update_checks.py): malformed, non-finite
or out-of-bounds updates, or a SecAgg+ sum that no honest inputs could produce, never become the
global model. With institution-level DP it sits inside `ClippedUpdatesOnly`, so it checks the
average before the noise is added (noise is unbounded; a noised average would fail the bound by
chance) and a rejected round is never noised nor counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

from flwr.common import NDArrays, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedOpt, FedProx, Strategy
from flwr.server import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow

from common import messages as m
from common.config import JobConfig
from server.round_log import InstitutionFailed, RoundLog
from server.update_checks import CheckedUpdates, UpdateBounds

# SecAgg+ sums quantised values modulo 2**32; Flower's stochastic rounding casts them to int32.
MODULUS = 2**32
INT32_MAX = 2**31 - 1

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


def make_strategy(job: JobConfig, initial: Parameters, evaluate_fn: EvaluateFn,
                  round_log: RoundLog | None = None) -> Strategy:
    """`federation.per_round` institutions train in each round (which: `LeastAskedFirst`); the
    coordinator evaluates centrally.

    Order: ClippedUpdatesOnly(CheckedUpdates(Flower's strategy)); rejections go to `round_log`.
    """
    fed = job.federation
    common = dict(
        fraction_fit=fed.fraction_per_round,
        fraction_evaluate=0.0,
        min_fit_clients=fed.per_round,  # Flower rounds the fraction down; this rounds it up
        min_evaluate_clients=0,
        min_available_clients=fed.institutions,
        initial_parameters=initial,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {
            m.SERVER_ROUND: server_round,
            m.MAX_WEIGHT: max_weight(job),
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
    strategy = CheckedUpdates(strategy, update_bounds(job, initial), round_log, void_round_on_rejection=dp.enabled)
    if dp.enabled:
        strategy = ClippedUpdatesOnly(strategy, dp.noise_multiplier, dp.clipping_norm, fed.per_round)
    return strategy


# What decides a strategy's next round besides the global weights: FedAdam's moments and its own copy of
# the weights (Flower's FedOpt), the count of noised rounds. FedAvg and FedProx keep nothing between rounds.
_OPT_ARRAYS = ("current_weights", "m_t", "v_t")


def _layers(strategy: Strategy) -> list[Strategy]:
    """The strategy and every strategy it wraps (ClippedUpdatesOnly, CheckedUpdates, Flower's)."""
    layers = [strategy]
    while (inner := getattr(layers[-1], "strategy", None)) is not None:
        layers.append(inner)
    return layers


def state_dict(strategy: Strategy, clients: LeastAskedFirst | None = None) -> dict:
    """The strategy's (and its client manager's) state after a round, for server/checkpoint.py:
    arrays and JSON values."""
    arrays: dict[str, NDArrays] = {}
    values: dict = {"asked": dict(clients.asked)} if clients is not None else {}
    for layer in _layers(strategy):
        if isinstance(layer, FedOpt):
            arrays.update({name: list(getattr(layer, name)) for name in _OPT_ARRAYS if getattr(layer, name) is not None})
        if isinstance(layer, ClippedUpdatesOnly):
            values["noised_rounds"] = layer.noised_rounds
    return {"arrays": arrays, "values": values}


def load_state_dict(strategy: Strategy, state: dict, clients: LeastAskedFirst | None = None) -> None:
    """Put a `state_dict` back into a strategy made by `make_strategy` for the same job (and its client manager)."""
    if clients is not None:
        clients.asked.update(state["values"].get("asked", {}))
    for layer in _layers(strategy):
        if isinstance(layer, FedOpt):
            for name in _OPT_ARRAYS:
                setattr(layer, name, [a.copy() for a in state["arrays"][name]] if name in state["arrays"] else None)
        if isinstance(layer, ClippedUpdatesOnly):
            layer.noised_rounds = int(state["values"].get("noised_rounds", 0))


def max_weight(job: JobConfig) -> int:
    """The largest weight an update may carry: `secure_aggregation.max_weight`, or 1 under institution-level DP,
    where every institution weighs 1. SecAgg+ quantises a weight w as round(w / max_weight * R): at the default
    100 000 a weight of 1 would be 10 737 steps and the average off by up to 2 * clipping_range / 10 737."""
    return 1 if job.institution_dp.enabled else job.secure_aggregation.max_weight


def update_bounds(job: JobConfig, initial: Parameters) -> UpdateBounds:
    """What an update may look like: the global model's shapes, values within the SecAgg+ clipping range."""
    secagg = job.secure_aggregation
    return UpdateBounds(
        shapes=tuple(a.shape for a in parameters_to_ndarrays(initial)),
        clipping_range=secagg.clipping_range,
        max_weight=float(max_weight(job)),
        institutions=job.federation.per_round,
        quantization_range=quantization_range(job.federation.per_round) if secagg.enabled else None,
    )


def quantization_range(institutions: int, modulus: int = MODULUS) -> int:
    """The largest SecAgg+ quantisation range R whose sum over `institutions` honest inputs never wraps.

    Flower 1.39's `secaggplus_mod` sends, per institution, the weight factor round(w / max_weight * R),
    in [0, R] for w <= max_weight, and each weighted value clipped to +-c and quantised as
    stochastic_round((v + c) * R / 2c): in [0, R], or R + 1 when the float product (c + c) * (R / 2c)
    rounds above R (it does for some c and R). The coordinator sums n of them modulo M; the sum
    never reaches M when n * (R + 1) <= M - 1. (The old 2^32 / n made n * R = M exactly for n a
    power of two: four or eight institutions at max_weight decoded a total weight of 0, and the
    global model became -inf.) The rounding casts to int32, so R + 1 <= 2^31 - 1 too.
    """
    if institutions < 1:
        raise ValueError("at least one institution")
    return min(INT32_MAX - 1, (modulus - 1) // institutions - 1)


def secagg_shares(sampled: int) -> int | float:
    """SecAgg+'s neighbourhood (`num_shares`, itself included) for a round of `sampled` institutions.

    SecAgg+ (Bell et al. 2020) masks each update with a logarithmic number of neighbours instead of
    everyone: here the odd number nearest above 3 log2(n), used once it is at most half the round
    (n >= 34: 17 of 34, 19 of 64, 21 of 100; BENCHMARKS.md measures what it saves), else every institution
    (1.0, as before). Flower's workflow draws the neighbours on a shuffled ring each round, and
    `reconstruction_threshold` stays a share of the neighbourhood. The privacy consequence is in
    server/report.py (`secagg_line`): a coordinator now needs that share of an institution's
    neighbours, not of the whole round, to unmask its update.
    """
    shares = 2 * math.ceil(1.5 * math.log2(max(sampled, 2))) + 1
    return shares if 2 * shares <= sampled else 1.0


class LeastAskedFirst(SimpleClientManager):
    """Each round asks the institutions asked least so far (ties at random): counts never differ by
    more than one, so none is asked for more than `federation.rounds_per_institution` rounds, the
    rounds its noise is planned for. An institution asked for more would decline past its grant."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[str] = Counter()

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = [cid for cid in self.clients if criterion is None or criterion.select(self.clients[cid])]
        if num_clients > len(available):
            return []
        random.shuffle(available)
        chosen = sorted(available, key=lambda cid: self.asked[cid])[:num_clients]  # a stable sort: ties stay shuffled
        self.asked.update(chosen)
        return [self.clients[cid] for cid in chosen]


def make_workflow(job: JobConfig) -> DefaultWorkflow:
    secagg = job.secure_aggregation
    if not secagg.enabled:
        return DefaultWorkflow(fit_workflow=default_fit_workflow)
    return DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=secagg_shares(job.federation.per_round),
            reconstruction_threshold=secagg.reconstruction_threshold,
            max_weight=float(max_weight(job)),
            clipping_range=secagg.clipping_range,
            quantization_range=quantization_range(job.federation.per_round),
            modulus_range=MODULUS,
            timeout=job.federation.round_timeout,
        )
    )
