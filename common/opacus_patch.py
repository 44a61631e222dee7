"""Opacus' RDP of one sampled-Gaussian step, computed once per mechanism and order, in memory and on disk.

Epsilon under PRV, the default accountant, took about half a second of every training message
(BENCHMARKS.md), nearly all of it in Opacus' RDP bound of its discretisation domain
(`compute_safe_domain_size`), which evaluates `_compute_rdp(q, sigma, alpha)` for ~150 orders,
twice, in pure Python; a noise search evaluates it for every candidate. It is a pure function of
its three numbers, and `compute_rdp` multiplies its values by the step count, so a job's fixed
mechanism needs them once. `memoize_rdp()` makes `compute_rdp` look each value up first; a value
is Opacus' own float, so every epsilon is bitwise the one Opacus computes without the memo
(tests/test_opacus_patch.py).

A ClientApp is a fresh process per message, so an institution keeps the values of its ledger's
mechanisms in a file beside the ledger (`save_memo` / `load_memo`): the next round's accounting then
costs milliseconds. The file is as trusted as the ledger next to it (its owner only, in the 0700
state folder); one another user could write, a malformed one, or one of another Opacus version is
ignored and the values are recomputed.

Like common/flower_patch.py, the patch runs only on `OPACUS_VERSION` with the pinned source digests.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

from common.flower_patch import mismatch
from common.processes import write_private

OPACUS_VERSION = "1.6.0"
# The per-order RDP that is memoised, and the loop that looks it up as a module global.
PATCHED = {
    "_compute_rdp": "0e5182bd9e03706de8d43d3fb0f1e4d88caf8f4c3c045ee45e7eccdad165df8f",
    "compute_rdp": "db9a15c5cd6fd244361e9d1de6870777d5dd5166d18b522c59f0264326b5455b",
}
MEMO_FORMAT = 1

Key = tuple[float, float, float]  # (sample rate, noise multiplier, order)
MEMO: dict[Key, float] = {}


def memoize_rdp() -> str | None:
    """Make Opacus' `compute_rdp` remember each `_compute_rdp` value (idempotent); why not, or None."""
    from opacus.accountants.analysis import rdp  # pylint: disable=import-outside-toplevel

    if getattr(rdp._compute_rdp, "memoized", False):
        return None
    reason = mismatch(rdp, PATCHED, "opacus", OPACUS_VERSION)
    if reason is not None:
        return reason
    compute = rdp._compute_rdp

    def memoized(q: float, sigma: float, alpha: float) -> float:
        key = (q, sigma, alpha)
        if key not in MEMO:
            MEMO[key] = compute(q, sigma, alpha)
        return MEMO[key]

    memoized.memoized = True
    memoized.__wrapped__ = compute  # Opacus' own, for tests/test_opacus_patch.py
    rdp._compute_rdp = memoized
    return None


def load_memo(path: Path) -> str | None:
    """Add the values kept in `path` to the memo; why they were not taken (the file named), or None."""
    path = Path(path)
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o022:
        return f"{path}: ignored: other users could have written it"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept["format"] != MEMO_FORMAT or kept["opacus"] != OPACUS_VERSION:
            return f"{path}: ignored: written for another Opacus or format"
        entries = [tuple(float(number) for number in entry) for entry in kept["entries"]]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}: ignored: not a memo of RDP values"
    if any(len(entry) != 4 or math.isnan(entry[3]) or entry[3] < 0 for entry in entries):
        return f"{path}: ignored: not a memo of RDP values"
    MEMO.update({entry[:3]: entry[3] for entry in entries})
    return None


def save_memo(path: Path, mechanisms: Iterable[tuple[float, float]]) -> None:
    """Keep the memo's values of `mechanisms` ((noise multiplier, sample rate) pairs) in `path`,
    written atomically and for its owner only."""
    wanted = {(float(rate), float(noise)) for noise, rate in mechanisms}
    entries = [[*key, value] for key, value in MEMO.items() if key[:2] in wanted]
    write_private(path, json.dumps({"format": MEMO_FORMAT, "opacus": OPACUS_VERSION, "entries": entries}).encode())
