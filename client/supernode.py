"""`flower-supernode` with a short idle poll: Flower 1.39's own SuperNode, patched as it starts.

Flower 1.39's SuperNode sleeps 3 s each time it asked the coordinator for a message and got none,
and 0.5 s between looks for its ClientApp's reply; no flag or setting changes either, and a SecAgg+
round waits on them four times. `python -m client.supernode ARGS` (the daemon's command with
`--pace fast`, client/daemon.py) takes the same ARGS as `flower-supernode`, swaps the `time`
module of `flwr.supernode.start_client_internal` (used there for those three sleeps only) for a
`_Clock` that waits `common.polling.Backoff` instead of 3 s and `REPLY_POLL` instead of 0.5 s, and
runs Flower's entry point, with `common.flower_patch.shorten_object_pulls` for the parts of the
messages it pulls. Everything else (TLS, node authentication, the Fleet protocol) is Flower's
code, unchanged.

It patches only the code it was written against (`common.flower_patch.mismatch`): Flower
`FLOWER_VERSION`, whose patched functions have the source digests in `PATCHED`
(tests/test_flower_pins.py fails when they change). On any other it says why and runs Flower
unpatched.
"""

from __future__ import annotations

import functools
import sys
import time
from types import ModuleType

from common.flower_patch import mismatch, shorten_object_pulls
from common.polling import Backoff
from common.proctitle import set_command_line

# SHA-256 of the source of each function the patch relies on, in flwr 1.39.0: the loop that sleeps
# IDLE_SLEEP when nothing was pulled, the pull whose result (a run id, or None) resets the backoff,
# and the push that sleeps REPLY_SLEEP until the ClientApp's reply is stored.
PATCHED = {
    "start_client_internal": "bb3df95a5f63b9849fef3ba5fac74c1d01677207e268c37d6895fb6d14399eff",
    "_pull_and_store_message": "eaf5d0e36dc34e4cf46a490511d077ac55cc8edbbcdbe938c1f6dbcb758628be",
    "_push_messages": "5f09f2f7a86ced070a9cb343920c8e3ba0c20fda956e7b6d2088965b428f42d2",
}
IDLE_SLEEP = 3  # Flower's sleeps, as written in that module
REPLY_SLEEP = 0.5
REPLY_POLL = 0.05  # a look at the node's own in-process state: cheap


class _Clock:
    """Stands in for the `time` module inside `flwr.supernode.start_client_internal`."""

    def __init__(self, sleep=time.sleep):
        self.idle, self._sleep = Backoff(), sleep

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            self._sleep(self.idle.next())
        elif seconds == REPLY_SLEEP:
            self._sleep(REPLY_POLL)
        else:
            self._sleep(seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch(module: ModuleType, sleep=time.sleep) -> _Clock:
    """Shorten the module's sleeps; any message pulled starts the idle backoff afresh."""
    clock = _Clock(sleep)
    pull = module._pull_and_store_message

    @functools.wraps(pull)
    def pull_and_store_message(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.idle.reset()
        return run_id

    module._pull_and_store_message = pull_and_store_message
    module.time = clock
    return clock


def main() -> None:
    import flwr.supernode.start_client_internal as internal  # pylint: disable=import-outside-toplevel
    from flwr.supernode.cli import flower_supernode  # pylint: disable=import-outside-toplevel

    reason = mismatch(internal, PATCHED)
    if reason is None:
        patch(internal)
    else:
        print(f"fedtune-client: running Flower's SuperNode unpatched (3 s polls): {reason}",
              file=sys.stderr, flush=True)
    reason = shorten_object_pulls()
    if reason is not None:
        print(f"fedtune-client: the SuperNode retries a message's parts at Flower's pace (1 s and more): {reason}",
              file=sys.stderr, flush=True)
    sys.argv[0] = "flower-supernode"
    set_command_line(sys.argv)  # as operators know it in `ps`
    flower_supernode()


if __name__ == "__main__":
    main()
