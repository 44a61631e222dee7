"""The institution's privacy ledger: every release derived from a data set, across jobs and restarts.

One SQLite file in the daemon's state directory. A round is recorded in two steps: `reserve`
writes a pending entry before training starts, and `release` marks it released just before the
update is handed to Flower for sending. SQLite commits are atomic, so a kill at any point leaves
either no entry, a pending one (trained, never sent: not counted) or a released one (counted).
The only window where the ledger can disagree with the network is after `release` and before
the bytes leave; there it over-counts, which is the safe side.

A data set is named by its operator (`dataset-id`), not by its file's bytes, so editing the file
never resets what was spent; each release records the SHA-256 of the file it was trained on.
Epsilon is never stored: it is always the accountant's value over the released history of the
data set, restored through Opacus' accountant `state_dict`, which names the mechanism it was
kept under. A job is keyed by fedtune's job id (client/round.py `job_key`), which a job resumed after
a coordinator crash keeps: its grant and noise plan carry over, and what it released in a round the
coordinator lost stays counted. Nothing here ever deletes a release. Only client/privacy/budget.py writes budgets, and only client/privacy/grant.py plans.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from common.accounting import HistoryEntry, NoisePlan, accountant_state, restore_accountant

LEDGER_FILE = "ledger.sqlite"  # in the node's state folder
RDP_MEMO_FILE = "rdp-memo.json"  # beside it: Opacus' RDP values of its mechanisms (common/opacus_patch.py)

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    dataset TEXT PRIMARY KEY,
    epsilon REAL NOT NULL CHECK (epsilon > 0),
    delta REAL NOT NULL CHECK (delta > 0 AND delta < 1),
    accountant TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS budget_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL REFERENCES datasets(dataset),
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    accountant TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    changed REAL NOT NULL,
    forced INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL REFERENCES datasets(dataset),
    job TEXT NOT NULL,
    round INTEGER NOT NULL,
    steps INTEGER NOT NULL CHECK (steps > 0),
    sample_rate REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    max_grad_norm REAL NOT NULL,
    mechanism TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released')),
    created REAL NOT NULL,
    released REAL
);
CREATE INDEX IF NOT EXISTS releases_by_dataset ON releases(dataset, status);
CREATE TABLE IF NOT EXISTS plans (
    dataset TEXT NOT NULL REFERENCES datasets(dataset),
    job TEXT NOT NULL,
    requested_epsilon REAL NOT NULL,
    granted_epsilon REAL NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate REAL NOT NULL,
    batch_size INTEGER NOT NULL,
    steps_per_round INTEGER NOT NULL,
    rounds INTEGER NOT NULL,
    PRIMARY KEY (dataset, job)
);
"""


@dataclass(frozen=True)
class Budget:
    """A data set's budget: set by the institution operator alone (client/privacy/budget.py)."""

    epsilon: float
    delta: float
    accountant: str


@dataclass(frozen=True)
class Dataset:
    id: str
    budget: Budget
    path: str  # the data file when last registered, for the operator's eyes only
    sha256: str  # its contents then


@dataclass(frozen=True)
class Grant:
    """What the institution granted a job, and the noise it planned for the job's rounds."""

    requested: float
    granted: float
    plan: NoisePlan


@dataclass(frozen=True)
class Release:
    id: int
    job: str
    round: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    mechanism: str
    content_sha256: str
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

    # -- data sets and budgets (written by client/privacy/budget.py only) ------------------------

    def dataset(self, dataset: str) -> Dataset | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT dataset, epsilon, delta, accountant, path, sha256 FROM datasets WHERE dataset=?",
                             (dataset,)).fetchone()
        return Dataset(row[0], Budget(*row[1:4]), row[4], row[5]) if row else None

    def datasets(self) -> list[Dataset]:
        with closing(self._connect()) as db:
            ids = [row[0] for row in db.execute("SELECT dataset FROM datasets ORDER BY dataset")]
        return [self.dataset(dataset) for dataset in ids]

    def write_dataset(self, dataset: Dataset, changed_by: str, forced: bool) -> None:
        """Insert or update a data set's row and log the budget it now has, in one transaction."""
        budget = dataset.budget
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(dataset) DO UPDATE SET "
                "epsilon=excluded.epsilon, delta=excluded.delta, accountant=excluded.accountant, path=excluded.path, "
                "sha256=excluded.sha256",
                (dataset.id, budget.epsilon, budget.delta, budget.accountant, dataset.path, dataset.sha256),
            )
            last = db.execute("SELECT epsilon, delta, accountant FROM budget_changes WHERE dataset=? ORDER BY id DESC "
                              "LIMIT 1", (dataset.id,)).fetchone()
            if last != (budget.epsilon, budget.delta, budget.accountant):
                db.execute("INSERT INTO budget_changes (dataset, epsilon, delta, accountant, changed_by, changed, forced) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (dataset.id, budget.epsilon, budget.delta, budget.accountant, changed_by, time.time(), int(forced)))

    def budget_changes(self, dataset: str) -> list[dict]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT epsilon, delta, accountant, changed_by, changed, forced FROM budget_changes "
                              "WHERE dataset=? ORDER BY id", (dataset,)).fetchall()
        keys = ("epsilon", "delta", "accountant", "changed_by", "changed", "forced")
        return [dict(zip(keys, row)) for row in rows]

    # -- releases ------------------------------------------------------------------------------

    def releases(self, dataset: str, include_pending: bool = False) -> list[Release]:
        query = (
            "SELECT id, job, round, steps, sample_rate, noise_multiplier, max_grad_norm, mechanism, content_sha256, "
            "status FROM releases WHERE dataset=? " + ("" if include_pending else "AND status='released' ") + "ORDER BY id"
        )
        with closing(self._connect()) as db:
            return [Release(*row) for row in db.execute(query, (dataset,))]

    def history(self, dataset: str, job: str | None = None) -> list[HistoryEntry]:
        """The accountant's history of what was released from `dataset` (by `job`, if given)."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.releases(dataset) if job in (None, r.job)]

    def accountant(self, dataset: str, job: str | None = None):
        """An Opacus accountant restored from the data set's released history (of `job`, if given)."""
        accountant = self._known(dataset).budget.accountant
        return restore_accountant(accountant_state(self.history(dataset, job), accountant), accountant)

    def spent(self, dataset: str, job: str | None = None) -> float:
        """Epsilon at the data set's own delta, by its own accountant, over everything released."""
        if not self.history(dataset, job):
            return 0.0
        return float(self.accountant(dataset, job).get_epsilon(delta=self._known(dataset).budget.delta))

    def _known(self, dataset: str) -> Dataset:
        known = self.dataset(dataset)
        if known is None:
            raise KeyError(f"no privacy budget set for data set {dataset!r}")
        return known

    def reserve(
        self, dataset: str, job: str, server_round: int, steps: int, sample_rate: float, noise_multiplier: float,
        max_grad_norm: float, content_sha256: str,
    ) -> int:
        """Write a pending entry before training; returns its id."""
        mechanism = self._known(dataset).budget.accountant
        with closing(self._connect()) as db:
            cursor = db.execute(
                "INSERT INTO releases (dataset, job, round, steps, sample_rate, noise_multiplier, max_grad_norm, "
                "mechanism, content_sha256, status, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (dataset, job, server_round, steps, sample_rate, noise_multiplier, max_grad_norm, mechanism,
                 content_sha256, time.time()),
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

    # -- grants (written by client/privacy/grant.py only) --------------------------------------

    def grant(self, dataset: str, job: str) -> Grant | None:
        """The grant and noise plan a job got for this data set before its first round, if any."""
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT requested_epsilon, granted_epsilon, noise_multiplier, sample_rate, batch_size, steps_per_round, "
                "rounds FROM plans WHERE dataset=? AND job=?",
                (dataset, job),
            ).fetchone()
        return Grant(row[0], row[1], NoisePlan(*row[2:])) if row else None

    def save_grant(self, dataset: str, job: str, grant: Grant) -> Grant:
        plan = grant.plan
        with closing(self._connect()) as db:
            db.execute(
                "INSERT INTO plans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (dataset, job, grant.requested, grant.granted, plan.noise_multiplier, plan.sample_rate, plan.batch_size,
                 plan.steps_per_round, plan.rounds),
            )
        return grant

    def grants(self, dataset: str) -> dict[str, Grant]:
        with closing(self._connect()) as db:
            jobs = [row[0] for row in db.execute("SELECT job FROM plans WHERE dataset=? ORDER BY rowid", (dataset,))]
        return {job: self.grant(dataset, job) for job in jobs}


def budget_summary(ledger: PrivacyLedger) -> list[dict]:
    """Per data set: budget, spent, remaining and who spent it, for `fedtune-client budget`."""
    rows = []
    for dataset in ledger.datasets():
        budget = dataset.budget
        releases = ledger.releases(dataset.id)
        spent = ledger.spent(dataset.id)
        jobs: dict[str, list[int]] = {}
        for release in releases:
            jobs.setdefault(release.job, []).append(release.round)
        grants = ledger.grants(dataset.id)
        rows.append(
            {
                "dataset": dataset.id,
                "file": dataset.path,
                "sha256": dataset.sha256,
                "budget_epsilon": budget.epsilon,
                "delta": budget.delta,
                "accountant": budget.accountant,
                "spent_epsilon": spent,
                "remaining_epsilon": max(budget.epsilon - spent, 0.0),
                "steps": sum(r.steps for r in releases),
                "jobs": {job: sorted(rounds) for job, rounds in jobs.items()},
                "grants": {job: {"requested_epsilon": g.requested, "granted_epsilon": g.granted,
                                 "spent_epsilon": ledger.spent(dataset.id, job)} for job, g in grants.items()},
                "budget_changes": ledger.budget_changes(dataset.id),
            }
        )
    return rows
