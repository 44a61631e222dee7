"""`flower-supernode` with a short idle poll: Flower 1.39's own SuperNode, patched as it starts.

Flower 1.39's SuperNode sleeps 3 s each time it asked the coordinator for a message and got none,
and 0.5 s between looks for its ClientApp's reply; no flag or setting changes either, and a SecAgg+
round waits on them four times. `python -m client.supernode ARGS` (the daemon's command with
`--pace fast`, client/daemon.py) takes the same ARGS as `flower-supernode`, swaps the `time`
module of `flwr.supernode.start_client_internal` (used there for those three sleeps only) for a
`_Clock` that waits `common.polling.Backoff` instead of 3 s and `REPLY_POLL` instead of 0.5 s, and
runs Flower's entry point. Everything else (TLS, node authentication, the Fleet protocol) is
Flower's code, unchanged.

It patches only the code it was written against: Flower `FLOWER_VERSION`, whose patched functions
have the source digests in `PATCHED` (tests/test_flower_pins.py fails when they change). On any
other it says why and runs Flower unpatched.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
import time
from importlib.metadata import version
from types import ModuleType

from common.polling import Backoff
from common.proctitle import set_command_line

FLOWER_VERSION = "1.39.0"
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


def source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


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


def unpatchable(module: ModuleType) -> str | None:
    """Why `module` is not the code the patch was written for, or None."""
    installed = version("flwr")
    if installed != FLOWER_VERSION:
        return f"flwr {installed} is installed, the patch is for {FLOWER_VERSION} only"
    changed = [name for name, digest in PATCHED.items()
               if not hasattr(module, name) or source_digest(getattr(module, name)) != digest]
    return f"{', '.join(changed)} changed in {module.__name__}" if changed else None


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

    reason = unpatchable(internal)
    if reason is None:
        patch(internal)
    else:
        print(f"fedtune-client: running Flower's SuperNode unpatched (3 s polls): {reason}",
              file=sys.stderr, flush=True)
    sys.argv[0] = "flower-supernode"
    set_command_line(sys.argv)  # as operators know it in `ps`
    flower_supernode()


if __name__ == "__main__":
    main()
