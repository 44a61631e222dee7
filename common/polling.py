"""How a deployed process waits for the next message: a short poll that backs off while idle.

Flower 1.39 waits a fixed 3 s between pulls on both sides of every exchange (the coordinator's
Grid, the institution's SuperNode), and a SuperExec 1 s between task claims; a SecAgg+ round
is four exchanges, so a round idled for seconds on sleeps alone. Here the first retry after
activity comes after `FIRST_DELAY` and each further one waits `FACTOR` times longer, up to
`BUSY_DELAY` while the last activity is less than `BUSY_SECONDS` old (the next exchange of a
round is usually that close, and three pollers stand between a reply and the next instruction),
then up to `MAX_DELAY`: an answer that is already on its way is picked up within a fifth of a
second, and a long wait (an institution training) costs about one request a second.

Past a reply deadline, a reply that reached the SuperLink in time is still fetched while its parts
keep coming; one without a new part for `STALLED_UPLOAD` seconds is given up (its sender died
mid-upload), so that a dead institution delays the round by that much, not by Flower's patience.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

FIRST_DELAY = 0.05
FACTOR = 1.5
BUSY_DELAY = 0.2
BUSY_SECONDS = 10.0
MAX_DELAY = 1.0
STALLED_UPLOAD = 15.0


@dataclass
class Backoff:
    """The delays between polls: `next()` for the wait before the next one, `reset()` when a poll got something."""

    first: float = FIRST_DELAY
    factor: float = FACTOR
    cap: float = MAX_DELAY
    busy_cap: float = BUSY_DELAY
    busy_for: float = BUSY_SECONDS
    clock: Callable[[], float] = time.monotonic
    _delay: float = field(default=0.0, init=False)
    _since: float = field(default=float("-inf"), init=False)  # the last activity: none yet

    def reset(self) -> None:
        self._delay, self._since = 0.0, self.clock()

    def next(self) -> float:
        cap = self.busy_cap if self.clock() - self._since < self.busy_for else self.cap
        self._delay = self.first if self._delay == 0.0 else min(self._delay * self.factor, cap)
        return self._delay
