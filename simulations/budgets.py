"""The simulated institutions' operator: registers each one's data set and budget before a job.

In deployment only `fedtune-client` sets a budget; in a simulation its user is every institution's
operator, so this does what each operator would, through the same code (client/privacy/budget.py).
A simulated institution's data set is named after the institution, so a job run again on the
same `--state-dir` draws on what earlier jobs spent, even if the split changed.
"""

from __future__ import annotations

from pathlib import Path

from client.privacy.budget import set_budget
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common.config import JobConfig, NodeConfig
from common.data import file_fingerprint


def register_budgets(job: JobConfig, state_dir: Path, epsilon: float | None = None, delta: float | None = None) -> None:
    """Each institution's budget: `epsilon`/`delta` where given; a new data set's default is the job's
    request (and accountant), a known one keeps what it has."""
    sha256 = file_fingerprint(job.data.train_path)
    for partition in range(job.federation.institutions):
        name = NodeConfig(partition_id=partition).institution
        ledger = PrivacyLedger(Path(state_dir) / name / LEDGER_FILE)
        new = ledger.dataset(name) is None
        set_budget(
            ledger, name, job.data.train_path, sha256,
            epsilon_budget=epsilon or (job.privacy.target_epsilon if new else None),
            delta=delta or (job.privacy.delta if new else None),
            accountant=job.privacy.accountant if new else None, changed_by="fedtune-sim",
        )
