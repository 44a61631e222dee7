"""What only the institution operator sets: which data set a file is, and that data set's budget.

Called by `fedtune-client start` and `fedtune-client budget set` (and, for simulated
institutions, by `fedtune-sim`, whose user is every institution's operator); never by the
ClientApp, so nothing the coordinator sends can set, raise or re-price a budget.

- A data set is named by an id (`--dataset-id`; by default derived once from the file's name and
  contents, then kept in the ledger). An edited file under a known id keeps everything spent; a
  known file path whose contents changed is refused unless the operator says which it is.
- Delta and accountant are pinned at first use. A change needs `force`, and is refused even then
  if it would lower the epsilon already spent: spent never decreases.
"""

from __future__ import annotations

import getpass
import re
import socket
from pathlib import Path

from client.privacy.ledger import Budget, Dataset, PrivacyLedger
from common.accounting import epsilon
from common.config import DEFAULT_ACCOUNTANT

DATASET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class BudgetError(ValueError):
    """A data set or budget the operator must settle; one line naming the flag or file."""


def operator() -> str:
    """Who changed a budget, for its log: the local user and host."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def resolve_dataset(ledger: PrivacyLedger, path: Path, sha256: str, dataset_id: str | None) -> str:
    """The id of the data set in `path` (contents `sha256`), by the rules in the module docstring."""
    path = Path(path).resolve()
    if dataset_id is not None:
        if not DATASET_ID.fullmatch(dataset_id):
            raise BudgetError(f"--dataset-id {dataset_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return dataset_id
    known = ledger.datasets()
    for dataset in known:
        if dataset.path == str(path):
            if dataset.sha256 == sha256:
                return dataset.id
            raise BudgetError(
                f"{path}: contents changed since it was registered as data set {dataset.id!r}; pass "
                f"--dataset-id {dataset.id} if it is the same data set edited (what it spent stays spent), or "
                "--dataset-id NEW_NAME to declare a new data set on purpose"
            )
    for dataset in known:
        if dataset.sha256 == sha256:  # the same file, moved or copied: the same records
            return dataset.id
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', path.stem)[:40] or 'data'}-{sha256[:8]}"


def set_budget(
    ledger: PrivacyLedger,
    dataset_id: str,
    path: Path,
    sha256: str,
    *,
    epsilon_budget: float | None,
    delta: float | None,
    accountant: str | None,
    force: bool = False,
    changed_by: str | None = None,
) -> Dataset:
    """Register the data set or update its budget; None keeps what is stored. Returns the stored row."""
    for flag, value in (("--budget-epsilon", epsilon_budget), ("--budget-delta", delta)):
        if value is not None and not (value > 0 and (flag != "--budget-delta" or value < 1)):
            raise BudgetError(f"{flag} {value:g}: must be positive" + (" and below 1" if flag == "--budget-delta" else ""))
    known = ledger.dataset(dataset_id)
    if known is None:
        if epsilon_budget is None or delta is None:
            raise BudgetError(
                f"data set {dataset_id!r} has no privacy budget yet: pass --budget-epsilon and --budget-delta "
                "(your institution's, not the job's)"
            )
        budget = Budget(epsilon_budget, delta, accountant or DEFAULT_ACCOUNTANT)
    else:
        old = known.budget
        budget = Budget(epsilon_budget or old.epsilon, delta or old.delta, accountant or old.accountant)
        if (budget.delta, budget.accountant) != (old.delta, old.accountant):
            _check_repricing(ledger, dataset_id, old, budget, force)
    dataset = Dataset(dataset_id, budget, str(Path(path).resolve()), sha256)
    ledger.write_dataset(dataset, changed_by or operator(), force)
    return dataset


def _check_repricing(ledger: PrivacyLedger, dataset_id: str, old: Budget, new: Budget, force: bool) -> None:
    if not force:
        raise BudgetError(
            f"data set {dataset_id!r} is accounted at delta {old.delta:g} with the {old.accountant} accountant since "
            f"its first use; pass --force-budget-change to change that (never allowed if it lowers what was spent)"
        )
    history = ledger.history(dataset_id)
    before, after = epsilon(history, old.delta, old.accountant), epsilon(history, new.delta, new.accountant)
    if after < before:
        raise BudgetError(
            f"data set {dataset_id!r}: delta {new.delta:g} / {new.accountant} would re-price its spent epsilon from "
            f"{before:.4f} down to {after:.4f}; refused even with --force-budget-change"
        )
