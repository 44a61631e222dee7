"""What fedtune changes inside Flower at run time (`pace = "fast"`), and the guard on each change.

Flower 1.39 has no setting for the waits that made a deployed round slow (BENCHMARKS.md). A patch
here, or in client/supernode.py, runs only on `FLOWER_VERSION` and only when the functions it
relies on have the source digests it was written against; otherwise it says why and Flower runs
as it is. tests/test_flower_pins.py fails when an upgrade changes any of them.

The patch in this module: Flower splits every message into content-addressed objects, and a
receiver that looks before the sender finished uploading them retries each missing object after
1 s, doubling up to 10 s (`PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP` in flwr/supercore/constant.py).
With short polls a receiver nearly always looks that early for a heavy message (the global weights,
a masked update), so each one waited 1-3 s on that backoff. `shorten_object_pulls()` makes the
first retry come after `FIRST_RETRY` and the longest wait `RETRY_CAP`, with as many tries as keep
Flower's patience (its tries times its cap), in the process that calls it: the coordinator's
ServerApp, the SuperNode and the bundle gate, whose forked ClientApps inherit it.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib.metadata import version

FLOWER_VERSION = "1.39.0"

# The two functions that pull a message's objects (the Grid and the SuperNode call the first,
# a ClientApp the second), with their retry defaults as Flower 1.39.0 ships them.
OBJECT_PULLS = {
    "pull_objects": "31bb2de46b450e6acfadb7a8bb15e3f2074bb112199826a40a5eaa648bad5b2b",
    "pull_and_inflate_object_from_tree": "139811483a15e4a6c1f8523614c12f28dd3049194e5713816be0931387adb1cf",
}
FLOWER_RETRIES = {"max_tries_per_object": 500, "initial_backoff": 1, "backoff_cap": 10}
FIRST_RETRY = 0.02
RETRY_CAP = 0.5
# What `shorten_object_pulls` sets: a short first retry, and Flower's total patience (its tries times its cap).
SHORT_RETRIES = {
    "max_tries_per_object": int(FLOWER_RETRIES["max_tries_per_object"] * FLOWER_RETRIES["backoff_cap"] / RETRY_CAP),
    "initial_backoff": FIRST_RETRY,
    "backoff_cap": RETRY_CAP,
}


def source_digest(function) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def mismatch(owner, pins: dict[str, str], distribution: str = "flwr", pinned: str = FLOWER_VERSION) -> str | None:
    """Why `owner` (a module) is not the code pinned in `pins` (name -> source digest) of `distribution`
    at version `pinned` (Flower's, unless named), or None."""
    installed = version(distribution)
    if installed != pinned:
        return f"{distribution} {installed} is installed, the patch is for {pinned} only"
    changed = [name for name, digest in pins.items()
               if not hasattr(owner, name) or source_digest(getattr(owner, name)) != digest]
    return f"{', '.join(changed)} changed in {owner.__name__}" if changed else None


def shorten_object_pulls() -> str | None:
    """Retry a message's missing objects soon; returns why it did not (the code is not the pinned one), or None."""
    from flwr.supercore.inflatable import inflatable_utils  # pylint: disable=import-outside-toplevel

    reason = mismatch(inflatable_utils, OBJECT_PULLS)
    if reason is None:
        for name in OBJECT_PULLS:
            getattr(inflatable_utils, name).__kwdefaults__.update(SHORT_RETRIES)
    return reason
