"""Two of the SuperLink's own chores, run less often than Flower 1.39 runs them.

Sampled with py-spy in a deployed round (3 institutions, SecAgg+; BENCHMARKS.md), a quarter of
the SuperLink's CPU went to two chores that repeat far more often than their results change:

- The sweep of expired task claims (`SqlCoreState._cleanup_expired_task_tokens`: two UPDATEs),
  which runs before nearly every state read and write, so on every poll of every SuperNode and
  of the ServerApp. Here it runs at most every `SWEEP_SECONDS`. Every Runtime API call still
  checks its claim's expiry on the spot (`authenticate_task` -> `get_task_by_token`, and
  `acknowledge_task_heartbeat` for heartbeats), so an expired claim is never used; what moves is
  the bookkeeping of one: it is put back to pending, or failed (and its run then shown failed),
  up to `SWEEP_SECONDS` later than Flower would, against claim timeouts of 30 and 60 s.
- The log stream's loop (`_stream_logs`), which reads a followed run's log and status every
  0.5 s; here every `LOG_STREAM_SECONDS`, so a follower sees log lines, and the run's end, up to
  that much later.

All of it is pinned by source digest (tests/test_flower_pins.py); with other code nothing changes.
"""

from __future__ import annotations

import functools
import threading
import time

from flwr.supercore.corestate.sql_corestate import SqlCoreState
from flwr.supercore.dependencies import task as task_auth
from flwr.superlink.servicer.control import control_handlers

from common.flower_patch import mismatch

SWEEP_SECONDS = 1.0
LOG_STREAM_SECONDS = 2.0
PACED = (f"the SuperLink sweeps expired task claims at most every {SWEEP_SECONDS:g} s and reads a followed "
         f"run's log every {LOG_STREAM_SECONDS:g} s")
# The sweep, and the checks of a claim's expiry on every use that make a late sweep harmless.
SWEEP_PINS = {
    "_cleanup_expired_task_tokens": "34301eae2ee4a008eb2d62da29b327c4941e7fa086ea86da55d412ca58498780",
    "get_task_by_token": "cf6795c4851955b9c545ac9cae183ee5cd75f3ac38393eb8fab72d7d4e41c6bc",
    "acknowledge_task_heartbeat": "b4e87c4b327d69781ed21c7542604b27faf8d5a367e4797231d9238517e6f558",
}
AUTH_PINS = {"authenticate_task": "7b4c0c58ea91353a9075df3af90acc2e5139cfa8f0ae9772651fbafecf25cc38"}
LOG_STREAM_PINS = {"_stream_logs": "cf1e7a091b57564dbc83207fa4045b5dcc5f1dfdba69383fbc0e9b169c3299d2"}


def paced_sweep(sweep, every: float = SWEEP_SECONDS, clock=time.monotonic):
    """`sweep(state)`, skipped when one started less than `every` seconds ago (in any thread)."""
    lock, last = threading.Lock(), [float("-inf")]

    @functools.wraps(sweep)
    def paced(state) -> None:
        with lock:
            started = clock()
            if started - last[0] < every:
                return
            last[0] = started
        sweep(state)

    return paced


def pace() -> str | None:
    """Pace both chores in this process (the SuperLink's); why not, when Flower's code is not the pinned one."""
    reason = (mismatch(SqlCoreState, SWEEP_PINS) or mismatch(task_auth, AUTH_PINS)
              or mismatch(control_handlers, LOG_STREAM_PINS))
    if reason is not None:
        return reason
    if hasattr(SqlCoreState._cleanup_expired_task_tokens, "__wrapped__"):
        return None  # paced already
    SqlCoreState._cleanup_expired_task_tokens = paced_sweep(SqlCoreState._cleanup_expired_task_tokens)
    control_handlers.LOG_STREAM_INTERVAL = LOG_STREAM_SECONDS  # `_stream_logs` reads the module's name
    return None
