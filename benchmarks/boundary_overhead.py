"""What the institution's trust boundary adds to a round, per ClientApp process (run by hand).

Prints a table: the pinned model's digest (cold: a fresh process reads the folder; warm: cached in
the process), the grant and the round's allowance against a ledger with N earlier releases, and
the reply's vetting. In deployment every message starts a fresh ClientApp process, so the cold
figures are what a deployed round pays once per training message.

    .venv/bin/python benchmarks/boundary_overhead.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.privacy.budget import set_budget  # noqa: E402
from client.privacy.grant import Request, allowance, grant_for  # noqa: E402
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger  # noqa: E402
from common.model_files import _digest, model_digest, packaged_model_path  # noqa: E402


def timed(call, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


class Rows(list):
    """Prints each row as it is measured: the PRV steps take seconds each."""

    def append(self, row) -> None:
        if not self:
            print(f"{'step':<62} {'seconds':>8}", flush=True)
        super().append(row)
        print(f"{row[0]:<62} {row[1]:>8.3f}", flush=True)


def main() -> None:
    folder = packaged_model_path()
    rows = Rows()

    def cold():
        _digest.cache_clear()
        model_digest(folder)

    rows.append(("model digest, cold (all-MiniLM-L6-v2, 90 MB)", timed(cold)))
    rows.append(("model digest, warm (same process)", timed(lambda: model_digest(folder))))
    for releases in (0, 20):
        with tempfile.TemporaryDirectory() as tmp:
            ledger = PrivacyLedger(Path(tmp) / LEDGER_FILE)
            set_budget(ledger, "bank", Path(tmp) / "bank.csv", "0" * 64, epsilon_budget=100.0, delta=1e-5,
                       accountant="prv")
            for index in range(releases):
                ledger.release(ledger.reserve("bank", f"old-{index % 5}", index, 3, 1 / 3, 1.8, 1.0, "0" * 64))
            request = Request(8.0, 20, 1.0, 1.0, 1024, 1024)  # a fixed batch of 1024
            first = timed(lambda: grant_for(ledger, "bank", f"job-{time.perf_counter_ns()}", request, 2500), repeat=1)
            grant = grant_for(ledger, "bank", "job", request, 2500)
            rows.append((f"grant at the job's first round, {releases} earlier releases", first))
            rows.append((f"allowance of a round, {releases} earlier releases", timed(lambda: allowance(ledger, "bank",
                                                                                                    "job", grant))))


if __name__ == "__main__":
    main()
