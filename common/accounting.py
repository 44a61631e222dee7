"""Privacy accounting over the whole history of what an institution released.

The state is always the accountant's own history, a list of (noise multiplier, sample rate,
steps) entries in Opacus' format; epsilon is recomputed from it on demand and never stored.
Pure functions, so they test without a network or a model. Opacus (and torch with it) is imported
by the functions that account, not by this module, so that operator commands stay quick; they
memoise Opacus' per-step RDP (common/opacus_patch.py), which changes no number.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.opacus_patch import memoize_rdp

HistoryEntry = tuple[float, float, int]


def expected_batch(records: int, rate: float, min_batch: int, max_batch: int) -> int:
    """An institution's expected batch: `rate` of its records, within [min_batch, max_batch].

    The batch, not the rate, is what Opacus' DPDataLoader takes; it then samples at
    `sample_rate(records, batch)` = 1 / ceil(records / batch), which is what the plan accounts
    for. Rounding the batch up keeps that rate at least 1 / ceil(1 / rate). A batch above
    `records` samples at rate 1.
    """
    if records < 1:
        raise ValueError("an institution needs at least one record")
    return min(max_batch, max(min_batch, math.ceil(rate * records - 1e-9)))


def sample_rate(records: int, batch_size: int) -> float:
    """Poisson sampling rate exactly as Opacus' DPDataLoader derives it (1 / batches per epoch)."""
    return 1.0 / math.ceil(records / batch_size)


def steps_per_round(records: int, batch_size: int, local_epochs: float) -> int:
    return max(1, round(local_epochs * math.ceil(records / batch_size)))


def compact(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Merge neighbouring entries with the same mechanism, as Opacus' accountants do."""
    merged: list[HistoryEntry] = []
    for noise, rate, steps in history:
        if merged and merged[-1][0] == noise and merged[-1][1] == rate:
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((float(noise), float(rate), int(steps)))
    return merged


def accountant_state(history: Sequence[HistoryEntry], mechanism: str) -> dict:
    """The history in Opacus' accountant `state_dict` form: it carries the mechanism it was written under."""
    return {"history": compact(history), "mechanism": mechanism}


def restore_accountant(state: dict, accountant: str):
    """An Opacus accountant of kind `accountant` holding `state`; Opacus refuses a state written
    under another mechanism, so a history is never read under one it was not kept for."""
    from opacus.accountants import create_accountant

    memoize_rdp()
    acc = create_accountant(accountant)
    acc.load_state_dict(state)
    return acc


def epsilon(history: Sequence[HistoryEntry], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of everything in `history`, by the named Opacus accountant."""
    if not history:
        return 0.0
    return _epsilon(tuple(compact(history)), delta, accountant)


# Pure and slow (PRV: up to a second), and simulated institutions of one size share their histories.
@functools.lru_cache(maxsize=256)
def _epsilon(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    return float(restore_accountant(accountant_state(history, accountant), accountant).get_epsilon(delta=delta))


@dataclass(frozen=True)
class NoisePlan:
    """The DP-SGD mechanism an institution runs for a whole job."""

    noise_multiplier: float
    sample_rate: float
    batch_size: int
    steps_per_round: int
    rounds: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    def history(self, rounds: int) -> list[HistoryEntry]:
        """What `rounds` full rounds of this plan add to the accountant's history."""
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round * rounds)] if rounds else []


def plan_noise(
    *,
    records: int,
    batch_size: int,
    local_epochs: float,
    rounds: int,
    grant: float,
    budget: float,
    delta: float,
    accountant: str,
    spent: Sequence[HistoryEntry] = (),
) -> NoisePlan:
    """Smallest noise such that all `rounds` of this job stay within `grant` on their own, and
    `spent` plus the job within `budget`.

    Calibrated once, before the first round, over every local step the job will take, so both
    bounds hold after the last round (up to Opacus' search tolerance, which errs on the safe
    side). Both are needed: composition is not additive, so a job that fits the budget's
    remainder can still cost more than its grant on its own.
    """
    rate = sample_rate(records, batch_size)
    steps = steps_per_round(records, batch_size, local_epochs)
    noise = _noise_for(grant, delta, rate, steps * rounds, accountant)
    if spent and epsilon([*spent, (noise, rate, steps * rounds)], delta, accountant) > budget:
        noise = _noise_after(spent, rate, steps * rounds, budget, delta, accountant)  # the budget binds: more noise
    return NoisePlan(float(noise), rate, batch_size, steps, rounds)


@functools.lru_cache(maxsize=64)
def _noise_for(grant: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    """Opacus' noise search (seconds under PRV), once per mechanism: institutions of one size plan alike."""
    from opacus.accountants.utils import get_noise_multiplier

    memoize_rdp()
    return get_noise_multiplier(target_epsilon=grant, target_delta=delta, sample_rate=rate, steps=steps,
                                accountant=accountant, epsilon_tolerance=0.01 * grant)


def steps_that_fit(
    history: Sequence[HistoryEntry],
    job_history: Sequence[HistoryEntry],
    mechanism: tuple[float, float],
    wanted: int,
    *,
    budget: float,
    grant: float,
    delta: float,
    accountant: str,
) -> tuple[int, float, float]:
    """Most steps (<= wanted) of `mechanism` (noise, sample rate) that keep the data set within
    `budget` and the job within `grant`; with the data set's and the job's epsilon after them."""
    noise, rate = mechanism

    def after(steps: int) -> tuple[float, float]:
        step = [(noise, rate, steps)] if steps else []
        return epsilon([*history, *step], delta, accountant), epsilon([*job_history, *step], delta, accountant)

    def fits(spent: tuple[float, float]) -> bool:
        return spent[0] <= budget and spent[1] <= grant

    best = after(wanted)
    if fits(best):
        return (wanted, *best)
    low, high, best = 0, wanted, after(0)  # `low` steps fit, `high` do not
    while high - low > 1:
        mid = (low + high) // 2
        spent = after(mid)
        if fits(spent):
            low, best = mid, spent
        else:
            high = mid
    return (low, *best)


def _noise_after(
    spent: Sequence[HistoryEntry], rate: float, steps: int, target: float, delta: float, accountant: str
) -> float:
    """Bisection for the noise whose steps, after `spent`, end at `target` (from above)."""
    if epsilon(spent, delta, accountant) >= target:
        raise ValueError(f"the budget of epsilon {target:g} is already spent")
    low, high = 0.0, 10.0
    while epsilon([*spent, (high, rate, steps)], delta, accountant) > target:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError("no noise multiplier below 1e4 fits the remaining budget")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        if epsilon([*spent, (mid, rate, steps)], delta, accountant) > target:
            low = mid
        else:
            high = mid
    return high


def institution_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Institution-level epsilon of DP-FedAvg with every institution in every round (RDP).

    Each round releases the average of updates clipped to C plus Gaussian noise of std
    noise_multiplier * C / n with n fixed: adding or removing one institution's whole data set
    moves the average by at most C / n, so a round is the Gaussian mechanism at this noise
    multiplier with sampling rate 1 (McMahan et al. 2018). With `federation.fraction_per_round` < 1,
    n is the round's sample and every noised round is counted for every institution: no
    amplification is claimed, since the coordinator, not chance, picks who takes part.
    """
    return epsilon([(noise_multiplier, 1.0, rounds)], delta, "rdp") if rounds else 0.0
