"""What the coordinator and the institutions say to each other, in Flower's records.

Both sides import these names, so a key is spelled once. Rounds run on Flower's legacy
fit workflow (the only one SecAgg+ works with): a train instruction is a `FitIns` (global weights
+ config), a train reply a `FitRes` whose metrics say what the institution released. Weights
travel as the ordered list of trainable tensors (`common.models.transport.trainable_state`).

Only data-free facts cross from an institution to the coordinator: `REPLY_METRICS` is the whole
list, and the institution's ClientApp refuses to send a reply with any other key. A refusal crosses
as a `Refusal` record (a reason code and a fixed sentence), never as an exception's text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

# Keys of the train reply's metrics.
INSTITUTION = "institution"
ACCOUNTANT = "accountant"
RECORDS = "records"  # training records rounded up to RECORD_GRANULARITY (its FedAvg weight, up to max-weight)
EPSILON = "epsilon"  # spent by this job, over all its rounds so far
DATASET_EPSILON = "dataset-epsilon"  # spent on the data set by every job so far, this one included
BUDGET_EPSILON = "budget-epsilon"  # the institution's budget for the data set
GRANT_EPSILON = "grant-epsilon"  # what the institution granted this job (at most its request)
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
STEPS = "steps"  # local DP-SGD steps taken in this round
TOTAL_STEPS = "total-steps"  # local DP-SGD steps taken in the whole job so far
MAX_GRAD_NORM = "max-grad-norm"
TRAIN_SECONDS = "train-seconds"  # whole seconds, rounded up
CLIPPED_TO = "update-clipped-to"  # institution-level DP: the L2 bound the update was clipped to

REPLY_METRICS = frozenset({
    INSTITUTION, ACCOUNTANT, RECORDS, EPSILON, DATASET_EPSILON, BUDGET_EPSILON, GRANT_EPSILON, DELTA,
    NOISE_MULTIPLIER, SAMPLE_RATE, STEPS, TOTAL_STEPS, MAX_GRAD_NORM, TRAIN_SECONDS, CLIPPED_TO,
})

# Record counts leave an institution only rounded up to a multiple of this (never 0): an exact
# count would single out one record's presence. Published in every privacy report.
RECORD_GRANULARITY = 100

# The legacy records a FitRes travels in (flwr.compat recorddict_compat).
FIT_METRICS = "fitres.metrics"

# Keys of the train instruction's config.
SERVER_ROUND = "server-round"
MAX_WEIGHT = "max-weight"
PROXIMAL_MU = "proximal_mu"  # Flower's legacy FedProx spelling


class Reason(StrEnum):
    """Why an institution refused a round: the only account of a refusal that leaves it."""

    BUDGET_SPENT = "budget-spent"
    DEADLINE_PASSED = "deadline-passed"
    NO_BUDGET = "no-budget"
    DATA_MISMATCH = "data-mismatch"
    MODEL_NOT_PINNED = "model-not-pinned"
    BUNDLE_NOT_APPROVED = "bundle-not-approved"
    BAD_INSTRUCTION = "bad-instruction"
    INTERNAL_ERROR = "internal-error"


SENTENCES = {
    Reason.BUDGET_SPENT: "declined: what is left of its privacy budget cannot pay for this round; nothing was released",
    Reason.DEADLINE_PASSED: "declined: the round's reply deadline had passed; nothing was released",
    Reason.NO_BUDGET: "refused: its operator has set no privacy budget for this data set",
    Reason.DATA_MISMATCH: "refused: its data does not match the job's columns or labels (details stay in its log)",
    Reason.MODEL_NOT_PINNED: "refused: the job's model is not the model its operator pinned",
    Reason.BUNDLE_NOT_APPROVED: "refused: its operator has not approved this app bundle",
    Reason.BAD_INSTRUCTION: "refused: the round's instruction is malformed",
    Reason.INTERNAL_ERROR: "failed: an error on the institution's side (details stay in its log)",
}
# The job goes on without the institution for that round; any other refusal stops the job.
DECLINES = frozenset({Reason.BUDGET_SPENT, Reason.DEADLINE_PASSED})

_MARKER = "fedtune-refusal"


@dataclass(frozen=True)
class Refusal:
    """A refusal as it crosses the boundary: JSON in the reason of Flower's error reply."""

    institution: str
    reason: Reason
    bundle: str = ""  # BUNDLE_NOT_APPROVED: the refused bundle's hash (the coordinator's own)

    @property
    def sentence(self) -> str:
        text = f"{self.institution} {SENTENCES[self.reason]}"
        return f"{text} (sha256:{self.bundle}; `fedtune-client approve {self.bundle}`)" if self.bundle else text

    @property
    def declined(self) -> bool:
        return self.reason in DECLINES

    def encode(self) -> str:
        record = {_MARKER: 1, "institution": self.institution, "reason": self.reason.value}
        return json.dumps(record | ({"bundle": self.bundle} if self.bundle else {}))

    @classmethod
    def decode(cls, text: str) -> Refusal | None:
        """The refusal in an error reason, or None for any other error (Flower's own)."""
        try:
            record = json.loads(text)
            if not isinstance(record, dict) or record.get(_MARKER) != 1:
                return None
            return cls(str(record["institution"]), Reason(record["reason"]), str(record.get("bundle", "")))
        except (ValueError, KeyError, TypeError):
            return None


class Refused(Exception):
    """Raised on the institution's side to refuse a round: `reason` crosses the boundary (as a
    `Refusal`), `detail` only reaches the institution's own log."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def describe_error(text: str) -> str:
    """An error as the coordinator operator reads it: each refusal record in it replaced by its sentence."""
    start = text.find('{"' + _MARKER)
    if start < 0:
        return text
    try:
        record, length = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return text
    refusal = Refusal.decode(json.dumps(record))
    shown = refusal.sentence if refusal else text[start:length]
    return text[:start] + shown + describe_error(text[length:])
