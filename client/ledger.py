"""The institution's privacy ledger: every release derived from a data set, across jobs and restarts.

One SQLite file in the daemon's state directory. A round is recorded in two steps: `reserve`
writes a pending entry before training starts, and `release` marks it released just before the
update is handed to Flower for sending. SQLite commits are atomic, so a kill at any point leaves
either no entry, a pending one (trained, never sent: not counted) or a released one (counted).
The only window where the ledger can disagree with the network is after `release` and before
the bytes leave; there it over-counts, which is the safe side.

Epsilon is never stored: it is always the accountant's value over the released history of the
data set (identified by the SHA-256 of the file's contents), whatever job or process wrote it.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from common.accounting import HistoryEntry, NoisePlan, epsilon

LEDGER_FILE = "ledger.sqlite"  # in the node's state folder

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset TEXT PRIMARY KEY,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL REFERENCES budgets(dataset),
    job TEXT NOT NULL,
    round INTEGER NOT NULL,
    steps INTEGER NOT NULL CHECK (steps > 0),
    sample_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    max_grad_norm REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released')),
    created REAL NOT NULL,
    released REAL
);
CREATE INDEX IF NOT EXISTS releases_by_dataset ON releases(dataset, status);
CREATE TABLE IF NOT EXISTS plans (
    dataset TEXT NOT NULL,
    job TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    batch_size INTEGER NOT NULL,
    steps_per_round INTEGER NOT NULL,
    rounds INTEGER NOT NULL,
    PRIMARY KEY (dataset, job)
);
"""


class BudgetExhausted(RuntimeError):
    """The institution declines a round: no step fits in what is left of its budget."""


@dataclass(frozen=True)
class Budget:
    epsilon: float
    delta: float
    accountant: str
    source: str  # the data file's path when the budget was set, for the operator's eyes only


@dataclass(frozen=True)
class Release:
    id: int
    job: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    status: str


class PrivacyLedger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed entry survives a power cut too
        return db

    def set_budget(self, dataset: str, budget: Budget) -> None:
        """Set or change a data set's budget; spending already recorded stays recorded."""
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO budgets VALUES (?, ?, ?, ?, ?) ON CONFLICT(dataset) DO UPDATE SET "
                "epsilon=excluded.epsilon, delta=excluded.delta, accountant=excluded.accountant, source=excluded.source",
                (dataset, budget.epsilon, budget.delta, budget.accountant, budget.source),
            )

    def budget(self, dataset: str) -> Budget:
        with closing(self._connect()) as db:
            row = db.execute("SELECT epsilon, delta, accountant, source FROM budgets WHERE dataset=?", (dataset,)).fetchone()
        if row is None:
            raise KeyError(f"no privacy budget set for data set {dataset[:12]}")
        return Budget(*row)

    def datasets(self) -> list[str]:
        with closing(self._connect()) as db:
            return [row[0] for row in db.execute("SELECT dataset FROM budgets ORDER BY source")]

    def releases(self, dataset: str, include_pending: bool = False) -> list[Release]:
        query = (
            "SELECT id, job, round, steps, sample_rate, noise_multiplier, max_grad_norm, status FROM releases "
            "WHERE dataset=? " + ("" if include_pending else "AND status='released' ") + "ORDER BY id"
        )
        with closing(self._connect()) as db:
            return [Release(*row) for row in db.execute(query, (dataset,))]

    def history(self, dataset: str, job: str | None = None) -> list[HistoryEntry]:
        """The accountant's history of what was released from `dataset` (by `job`, if given)."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases(dataset) if job in (None, r.job)]

    def spent(self, dataset: str, job: str | None = None) -> float:
        budget = self.budget(dataset)
        return epsilon(self.history(dataset, job), budget.delta, budget.accountant)

    def plan(self, dataset: str, job: str) -> NoisePlan | None:
        """The noise plan a job fixed for this data set before its first round, if any."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT noise_multiplier, sample_rate, batch_size, steps_per_round, rounds FROM plans "
                "WHERE dataset=? AND job=?",
                (dataset, job),
            ).fetchone()
        return NoisePlan(*row) if row else None

    def save_plan(self, dataset: str, job: str, plan: NoisePlan) -> NoisePlan:
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?)",
                (dataset, job, plan.noise_multiplier, plan.sample_rate, plan.batch_size, plan.steps_per_round,
                 plan.rounds),
            )
        return plan

    def steps_that_fit(
        self, dataset: str, noise_multiplier: float, sample_rate: float, wanted: int
    ) -> tuple[int, float]:
        """Most steps (<= wanted) of this mechanism that keep the data set within its budget,
        and the data set's epsilon after them."""
        budget = self.budget(dataset)
        history = self.history(dataset)

        def after(steps: int) -> float:
            return epsilon([*history, (noise_multiplier, sample_rate, steps)], budget.delta, budget.accountant)

        best = (wanted, after(wanted))
        if best[1] <= budget.epsilon:
            return best
        low, high = 0, wanted  # `low` steps fit, `high` do not
        best = (0, epsilon(history, budget.delta, budget.accountant))
        while high - low > 1:
            mid = (low + high) // 2
            spent = after(mid)
            if spent <= budget.epsilon:
                low, best = mid, (mid, spent)
            else:
                high = mid
        return best

    def reserve(
        self, dataset: str, job: str, server_round: int, steps: int, sample_rate: float, noise_multiplier: float,
        max_grad_norm: float,
    ) -> int:
        """Write a pending entry before training; returns its id."""
        with closing(self._connect()) as db:
            cursor = db.execute(
                "INSERT INTO releases (dataset, job, round, steps, sample_rate, noise_multiplier, max_grad_norm, "
                "status, created) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (dataset, job, server_round, steps, sample_rate, noise_multiplier, max_grad_norm, time.time()),
            )
            return int(cursor.lastrowid)

    def release(self, entry: int) -> None:
        """Mark a reserved entry released: call right before the update is handed over for sending."""
        with closing(self._connect()) as db:
            changed = db.execute(
                "UPDATE releases SET status='released', released=? WHERE id=? AND status='pending'", (time.time(), entry)
            ).rowcount
        if changed != 1:
            raise RuntimeError(f"ledger entry {entry} is not pending")


def budget_summary(ledger: PrivacyLedger) -> list[dict]:
    """Per data set: budget, spent, remaining and who spent it, for `fedtune-client budget`."""
    rows = []
    for dataset in ledger.datasets():
        budget = ledger.budget(dataset)
        releases = ledger.releases(dataset)
        spent = ledger.spent(dataset)
        jobs: dict[str, list[int]] = {}
        for release in releases:
            jobs.setdefault(release.job, []).append(release.round)
        rows.append(
            {
                "dataset": dataset,
                "file": budget.source,
                "budget_epsilon": budget.epsilon,
                "delta": budget.delta,
                "accountant": budget.accountant,
                "spent_epsilon": spent,
                "remaining_epsilon": max(budget.epsilon - spent, 0.0),
                "steps": sum(r.steps for r in releases),
                "jobs": {job: sorted(rounds) for job, rounds in jobs.items()},
            }
        )
    return rows
