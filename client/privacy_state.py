"""An institution's privacy state within one job, kept in its Flower node context.

Kept as the noise plan fixed before the first round and the accountant's history, never as
an epsilon: epsilon is always recomputed from the history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ConfigRecord, RecordDict

from common.accounting import HistoryEntry, NoisePlan

KEY = "fedtune-privacy"


@dataclass
class PrivacyState:
    plan: NoisePlan | None = None
    history: list[HistoryEntry] = field(default_factory=list)

    @classmethod
    def load(cls, state: RecordDict) -> PrivacyState:
        if KEY not in state:
            return cls()
        rec = state[KEY]
        plan = NoisePlan(
            float(rec["noise"]), float(rec["rate"]), int(rec["batch"]), int(rec["steps-per-round"]), int(rec["rounds"])
        )
        history = list(zip(rec["history-noise"], rec["history-rate"], rec["history-steps"]))
        return cls(plan, [(float(n), float(q), int(s)) for n, q, s in history])

    def save(self, state: RecordDict) -> None:
        assert self.plan is not None
        state[KEY] = ConfigRecord(
            {
                "noise": self.plan.noise_multiplier,
                "rate": self.plan.sample_rate,
                "batch": self.plan.batch_size,
                "steps-per-round": self.plan.steps_per_round,
                "rounds": self.plan.rounds,
                "history-noise": [float(n) for n, _, _ in self.history],
                "history-rate": [float(q) for _, q, _ in self.history],
                "history-steps": [int(s) for _, _, s in self.history],
            }
        )
