"""What the coordinator checks before institutions' updates, or their SecAgg+ sum, become the global model.

`CheckedUpdates` wraps the job's strategy and overrides one method, `aggregate_fit`: both Flower
workflows hand their results to it, so it is the one place every update passes. Nothing is trusted
that an institution could get wrong or lie about: the arrays' number, shapes and dtype, their values,
and the weight it reports.

- **Without SecAgg+** each update is checked on its own; one that fails is dropped from the round
  (recorded under the institution's name with a `Rejection`), and the others are averaged as usual.
  The bound on values is `secure_aggregation.clipping_range`, the bound SecAgg+ clips to: every
  value of an accepted update lies in [-clipping_range, clipping_range], so its L2 norm is at most
  clipping_range * sqrt(parameters). What SecAgg+ would have clipped silently, the plain path
  refuses. No tighter norm holds for every job: institutions send whole weights, not differences.
- **With SecAgg+** the coordinator holds only the decoded weighted average, which Flower's
  `SecAggPlusWorkflow.unmask_stage` puts into every result's `FitRes.parameters` before it calls
  `aggregate_fit`; each `FitRes.num_examples` is the weight that institution reported in plain.
  Flower's `secaggplus_mod` clips each *weighted* value w/max_weight * x to +-c (c = clipping_range)
  and quantises it to an integer in [0, R] (R + 1 when the float product rounds above R), with
  stochastic rounding, so each integer is within 1 of the exact value. With n updates whose values
  lie in [-c, c] the decoded average lies within c + 2c*n/Q, where Q is the sum of the quantised
  weights (each round(w/max_weight * R)). A sum outside that, with a NaN or an infinity, a zero
  total weight (Flower divides by it: every value becomes infinite or NaN), more inputs than the
  quantisation range was sized for, or a reported weight outside [1, max_weight], is rejected
  whole (recorded under "aggregate"): the global model stays as it was for that round.
- **With institution-level DP** a round with a rejected update is voided: Flower's noise is
  calibrated for every institution's update in the average (it voids a round with any failure, too).

What no check here can stop: with SecAgg+ an institution can bias the sum by anything up to its
clipped share; robust aggregation (median, Krum, trimmed mean) needs each update, which SecAgg+
hides from the coordinator by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from logging import WARNING

import numpy as np
from flwr.common import FitRes, NDArrays, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common import messages as m
from server.round_log import RoundLog

AGGREGATE = "aggregate"  # who a rejection names when it is the SecAgg+ sum, or a voided round
# Decoding is float64 arithmetic on integers below 2^32: far finer than this, far coarser than a real excess.
FLOAT_SLACK = 1e-9


class Rejection(StrEnum):
    """Why the coordinator refused an update (or a SecAgg+ sum): the code the round log records."""

    MALFORMED = "malformed"
    WRONG_ARRAY_COUNT = "wrong-array-count"
    WRONG_SHAPE = "wrong-shape"
    NON_FINITE = "non-finite"
    OUT_OF_BOUNDS = "out-of-bounds"
    WEIGHT_OUT_OF_RANGE = "weight-out-of-range"
    ZERO_TOTAL_WEIGHT = "zero-total-weight"
    TOO_MANY_UPDATES = "too-many-updates"
    VOIDED_UNDER_INSTITUTION_DP = "voided-under-institution-dp"


SENTENCES = {
    Rejection.MALFORMED: "its arrays cannot be read as real numbers",
    Rejection.WRONG_ARRAY_COUNT: "it does not hold one array per trainable tensor of the global model",
    Rejection.WRONG_SHAPE: "an array's shape differs from the global model's",
    Rejection.NON_FINITE: "a value is NaN or infinite",
    Rejection.OUT_OF_BOUNDS: "a value lies beyond what updates within +-clipping_range allow",
    Rejection.WEIGHT_OUT_OF_RANGE: "a reported weight is not between 1 and max_weight",
    Rejection.ZERO_TOTAL_WEIGHT: "the total weight is 0 (the SecAgg+ sum of weights decoded as 0 modulo 2^32)",
    Rejection.TOO_MANY_UPDATES: "more institutions were summed than the SecAgg+ quantisation range was sized for",
    Rejection.VOIDED_UNDER_INSTITUTION_DP: "an update was rejected, and institution-level noise is calibrated for "
    "every institution's update: the round is voided",
}


@dataclass(frozen=True)
class UpdateBounds:
    """What an acceptable update, or SecAgg+ sum, looks like for one job."""

    shapes: tuple[tuple[int, ...], ...]  # the global model's arrays, in order
    clipping_range: float
    max_weight: float
    institutions: int  # SecAgg+: how many inputs the quantisation range was sized for
    quantization_range: int | None = None  # SecAgg+ on: the results carry the decoded sum; None: plain updates


def _arrays(parameters: Parameters, bounds: UpdateBounds) -> tuple[NDArrays | None, Rejection | None]:
    try:
        arrays = parameters_to_ndarrays(parameters)
    except Exception:  # bytes that are no numpy array (or a pickled object, which numpy refuses)
        return None, Rejection.MALFORMED
    if any(not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.floating) for a in arrays):
        return None, Rejection.MALFORMED
    if len(arrays) != len(bounds.shapes):
        return None, Rejection.WRONG_ARRAY_COUNT
    if any(a.shape != shape for a, shape in zip(arrays, bounds.shapes)):
        return None, Rejection.WRONG_SHAPE
    return arrays, None


def _largest(arrays: NDArrays) -> float:
    return max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)


def _weight_ok(weight: int, bounds: UpdateBounds) -> bool:
    return 1 <= weight <= bounds.max_weight


def check_update(fit_res: FitRes, bounds: UpdateBounds) -> Rejection | None:
    """Without SecAgg+: why one institution's update cannot be averaged, or None."""
    arrays, why = _arrays(fit_res.parameters, bounds)
    if why is not None:
        return why
    if not all(np.isfinite(a).all() for a in arrays):
        return Rejection.NON_FINITE
    if _largest(arrays) > bounds.clipping_range:
        return Rejection.OUT_OF_BOUNDS
    if not _weight_ok(fit_res.num_examples, bounds):
        return Rejection.WEIGHT_OUT_OF_RANGE
    return None


def sum_bound(weights: list[int], bounds: UpdateBounds) -> float:
    """With SecAgg+: the largest |value| a decoded average of inputs within +-clipping_range can have."""
    quantized = sum(round(w / bounds.max_weight * bounds.quantization_range) for w in weights)  # as secaggplus_mod
    if quantized <= 0:
        return 0.0
    c = bounds.clipping_range
    return (c + 2 * c * len(weights) / quantized) * (1 + FLOAT_SLACK)


def check_sum(results: list[tuple[ClientProxy, FitRes]], bounds: UpdateBounds) -> Rejection | None:
    """With SecAgg+: why the decoded weighted average every result carries cannot become the model, or None."""
    if len(results) > bounds.institutions:
        return Rejection.TOO_MANY_UPDATES
    weights = [fit_res.num_examples for _, fit_res in results]
    if not all(_weight_ok(w, bounds) for w in weights):
        return Rejection.WEIGHT_OUT_OF_RANGE
    arrays, why = _arrays(results[0][1].parameters, bounds)  # the workflow gives every result the one sum
    if why is not None:
        return why
    finite = [np.isfinite(a) for a in arrays]
    if not any(f.any() for f in finite) or sum_bound(weights, bounds) == 0.0:
        return Rejection.ZERO_TOTAL_WEIGHT
    if not all(f.all() for f in finite):
        return Rejection.NON_FINITE
    if _largest(arrays) > sum_bound(weights, bounds):
        return Rejection.OUT_OF_BOUNDS
    return None


def in_float32(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """With SecAgg+: the decoded sum in float32, the institutions' own precision. Flower's
    `dequantize` decodes in float64, so the global model, and every later round's download, would
    otherwise double in bytes (benchmarks/large_updates.py) for digits no institution's float32
    model keeps. The workflow gives every result the one sum: it is converted once."""
    parameters = ndarrays_to_parameters([a.astype(np.float32) for a in parameters_to_ndarrays(results[0][1].parameters)])
    for _, fit_res in results:
        fit_res.parameters = parameters
    return results


class CheckedUpdates(Strategy):
    """A strategy whose `aggregate_fit` sees only updates (or a SecAgg+ sum) that pass the checks."""

    def __init__(self, strategy: Strategy, bounds: UpdateBounds, round_log: RoundLog | None = None,
                 void_round_on_rejection: bool = False):
        self.strategy, self.bounds = strategy, bounds
        self.round_log = round_log if round_log is not None else RoundLog()
        self.void_round_on_rejection = void_round_on_rejection

    def __repr__(self) -> str:
        return f"CheckedUpdates({self.strategy!r})"

    def _reject(self, server_round: int, who: str, why: Rejection) -> None:
        log(WARNING, "round %s: the coordinator rejected %s: %s (%s)", server_round,
            "the SecAgg+ sum" if who == AGGREGATE else f"{who}'s update", why, SENTENCES[why])
        self.round_log.reject(server_round, who, why)

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return self.strategy.aggregate_fit(server_round, results, failures)
        if self.bounds.quantization_range is not None:
            why = check_sum(results, self.bounds)
            if why is not None:
                self._reject(server_round, AGGREGATE, why)
                return None, {}
            return self.strategy.aggregate_fit(server_round, in_float32(results), failures)
        kept = []
        for proxy, fit_res in results:
            why = check_update(fit_res, self.bounds)
            if why is None:
                kept.append((proxy, fit_res))
            else:
                self._reject(server_round, str(fit_res.metrics.get(m.INSTITUTION, f"node {proxy.cid}")), why)
        if len(kept) < len(results) and self.void_round_on_rejection:
            self._reject(server_round, AGGREGATE, Rejection.VOIDED_UNDER_INSTITUTION_DP)
            return None, {}
        if not kept:
            return None, {}
        return self.strategy.aggregate_fit(server_round, kept, failures)

    # Everything else is the wrapped strategy's.
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.strategy.evaluate(server_round, parameters)
