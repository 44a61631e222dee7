import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.privacy.budget import set_budget
from client.privacy.ledger import PrivacyLedger
from common.accounting import epsilon, steps_that_fit

DATASET = "bank"
SHA = "a" * 64


def _ledger(tmp_path: Path, budget: float = 8.0, accountant: str = "rdp") -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    set_budget(ledger, DATASET, tmp_path / "bank.csv", SHA, epsilon_budget=budget, delta=1e-6, accountant=accountant)
    return ledger


def _round(ledger: PrivacyLedger, job: str, rnd: int, steps: int = 20, noise: float = 1.2, rate: float = 0.05) -> None:
    ledger.release(ledger.reserve(DATASET, job, rnd, steps, rate, noise, 1.0, SHA))


def test_three_jobs_of_two_rounds_equal_one_history_of_six(tmp_path):
    ledger = _ledger(tmp_path)
    for job in ("job-1", "job-2", "job-3"):
        for rnd in (1, 2):
            _round(ledger, job, rnd)
    assert ledger.spent(DATASET) == pytest.approx(epsilon([(1.2, 0.05, 120)], 1e-6, "rdp"), rel=1e-9)
    assert ledger.spent(DATASET, "job-2") == pytest.approx(epsilon([(1.2, 0.05, 40)], 1e-6, "rdp"), rel=1e-9)


def test_restart_keeps_what_was_spent_and_pending_entries_do_not_count(tmp_path):
    ledger = _ledger(tmp_path)
    _round(ledger, "job-1", 1)
    ledger.reserve(DATASET, "job-1", 2, 20, 0.05, 1.2, 1.0, SHA)  # trained, never sent
    spent = ledger.spent(DATASET)
    reopened = PrivacyLedger(tmp_path / "ledger.sqlite")
    assert reopened.spent(DATASET) == spent == pytest.approx(epsilon([(1.2, 0.05, 20)], 1e-6, "rdp"))
    assert [r.status for r in reopened.releases(DATASET, include_pending=True)] == ["released", "pending"]


def test_a_round_that_would_overspend_is_cut_short_then_declined(tmp_path):
    ledger = _ledger(tmp_path, budget=2.0)
    rounds = []
    for rnd in range(1, 20):
        steps, after, _ = steps_that_fit(ledger.history(DATASET), [], (2.0, 0.05), 50, budget=2.0, grant=2.0,
                                         delta=1e-6, accountant="rdp")
        rounds.append(steps)
        if steps:
            _round(ledger, "greedy-job", rnd, steps=steps, noise=2.0)
            assert after == pytest.approx(ledger.spent(DATASET))
        assert ledger.spent(DATASET) <= 2.0
    assert rounds[0] == 50 and 0 < min(s for s in rounds if s) < 50  # full rounds, then a short one
    assert rounds[-1] == 0  # then declined


@pytest.mark.parametrize(("rate", "noise", "steps"), [(0.01, 1.0, 1000), (0.05, 0.8, 200), (0.2, 2.0, 60), (1 / 3, 1.77, 60)])
def test_rdp_is_never_below_independent_tight_accountants(rate, noise, steps):
    """Opacus RDP against Opacus PRV and Google's dp-accounting PLD (both tight): RDP may only be looser."""
    from dp_accounting import dp_event, pld

    rdp = epsilon([(noise, rate, steps)], 1e-5, "rdp")
    prv = epsilon([(noise, rate, steps)], 1e-5, "prv")
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise)), steps)
    google = accountant.get_epsilon(1e-5)
    assert rdp >= prv - 0.02
    assert rdp >= google - 0.02
    assert abs(prv - google) < 0.05 * google + 0.02  # the two tight ones agree


_CHILD = """
import random, sys, time
from client.privacy.budget import set_budget
from client.privacy.ledger import PrivacyLedger
ledger = PrivacyLedger(sys.argv[1]); sent = open(sys.argv[2], "a")
if ledger.dataset("d") is None:
    set_budget(ledger, "d", "x.csv", "d" * 64, epsilon_budget=1e9, delta=1e-6, accountant="rdp")
print("ready", flush=True)
while True:
    entry = ledger.reserve("d", "job", 1, random.randint(1, 9), 0.01, 1.0, 1.0, "d" * 64)
    time.sleep(random.random() * 0.01)          # training
    ledger.release(entry)
    sent.write(f"{entry}\\n"); sent.flush()      # the update leaves
"""


def test_random_kills_never_lose_a_sent_entry_nor_count_an_unsent_one(tmp_path):
    db, sent_log = tmp_path / "ledger.sqlite", tmp_path / "sent.txt"
    rng = random.Random(0)
    kills = 12
    for _ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(db), str(sent_log)], cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE, text=True,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.random() * 0.3)  # a random point in the loop
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    ledger = PrivacyLedger(db)
    released = {r.id for r in ledger.releases("d")}
    sent = {int(line) for line in sent_log.read_text().split()}
    assert sent, "the child never got to send anything"
    assert sent <= released  # nothing that left is missing from the ledger
    assert len(released - sent) <= kills  # at most the one in flight at each kill, counted on the safe side
    statuses = {r.status for r in ledger.releases("d", include_pending=True)}
    assert statuses <= {"released", "pending"}
