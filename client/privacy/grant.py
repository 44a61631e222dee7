"""What a job gets from a data set: the institution's terms applied to the job's request.

A job's `privacy.target_epsilon` is a request. Before the job's first round the institution
grants it at most what its budget has left, plans the noise for every round the job asks for at
the data set's own delta and accountant, and stores grant and plan together; every later round of
the job (also after a restart) uses that plan. Each round then takes only the steps that keep both
the job within its grant and the data set within its budget, or is declined.
"""

from __future__ import annotations

from dataclasses import dataclass

from client.privacy.ledger import Grant, PrivacyLedger
from common.accounting import expected_batch, plan_noise, steps_that_fit
from common.config import JobConfig
from common.messages import Reason, Refused

# A job is declined outright when less than this share of the budget is left: the noise needed
# to fit in it would make the update worthless, yet it would still cost the rest of the budget.
MIN_GRANT = 0.02


@dataclass(frozen=True)
class Request:
    """What a job asks of an institution; every number here is the coordinator's, so only a request.

    `rounds`: the most rounds the job will ask this institution to take part in, which its noise is
    planned for; a coordinator that asks for more gets no step past the grant (`allowance`).
    The expected batch follows the institution's size (`expected_batch`); min_batch = max_batch
    is a fixed batch."""

    epsilon: float
    rounds: int
    local_epochs: float
    sampling_rate: float
    min_batch: int
    max_batch: int

    @classmethod
    def of(cls, job: JobConfig) -> Request:
        training = job.training
        fixed = training.batch_size
        return cls(job.privacy.target_epsilon, job.federation.rounds_per_institution, training.local_epochs,
                   1.0 if fixed else training.sampling_rate, fixed or training.min_batch, fixed or training.max_batch)

    def batch_size(self, records: int) -> int:
        return expected_batch(records, self.sampling_rate, self.min_batch, self.max_batch)


@dataclass(frozen=True)
class RoundAllowance:
    steps: int
    dataset_epsilon: float  # after the round's steps
    job_epsilon: float


def grant_for(ledger: PrivacyLedger, dataset: str, job: str, request: Request, records: int) -> Grant:
    """The job's grant and plan: stored at the job's first round, read back at every later one."""
    if (existing := ledger.grant(dataset, job)) is not None:
        return existing
    known = ledger.dataset(dataset)
    if known is None:
        raise Refused(Reason.NO_BUDGET, f"data set {dataset!r} has no budget in {ledger.path}")
    budget = known.budget
    spent = ledger.spent(dataset)
    left = budget.epsilon - spent
    if left < MIN_GRANT * budget.epsilon:
        raise Refused(Reason.BUDGET_SPENT, f"job {job} declined: data set {dataset!r} has spent {spent:.3f} of "
                                           f"epsilon {budget.epsilon:g} (delta {budget.delta:g})")
    granted = min(request.epsilon, left)
    try:
        plan = plan_noise(
            records=records, batch_size=request.batch_size(records), local_epochs=request.local_epochs,
            rounds=request.rounds,
            grant=granted, budget=budget.epsilon, delta=budget.delta, accountant=budget.accountant,
            spent=ledger.history(dataset),
        )
    except ValueError as exc:  # what is left cannot pay for even the noisiest plan
        raise Refused(Reason.BUDGET_SPENT, f"job {job} declined: {exc} (spent {spent:.3f})") from None
    return ledger.save_grant(dataset, job, Grant(request.epsilon, granted, plan))


def allowance(ledger: PrivacyLedger, dataset: str, job: str, grant: Grant) -> RoundAllowance:
    """The steps of the job's plan this round may take; Refused when none fits."""
    budget = ledger.dataset(dataset).budget
    plan = grant.plan
    steps, dataset_epsilon, job_epsilon = steps_that_fit(
        ledger.history(dataset), ledger.history(dataset, job), (plan.noise_multiplier, plan.sample_rate),
        plan.steps_per_round, budget=budget.epsilon, grant=grant.granted, delta=budget.delta,
        accountant=budget.accountant,
    )
    if steps == 0:
        raise Refused(Reason.BUDGET_SPENT, f"job {job}: no step fits: job spent {job_epsilon:.3f} of its grant "
                                           f"{grant.granted:g}, data set {dataset_epsilon:.3f} of {budget.epsilon:g}")
    return RoundAllowance(steps, dataset_epsilon, job_epsilon)
