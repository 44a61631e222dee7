"""How a deployed process waits for the next message: a short poll that backs off while idle.

Flower 1.39 waits a fixed 3 s between pulls on both sides of every exchange (the coordinator's
Grid, the institution's SuperNode), and a SuperExec 1 s between task claims; a SecAgg+ round
is four exchanges, so a round idled for seconds on sleeps alone. Here the first retry after
activity comes after `FIRST_DELAY` and each further one waits `FACTOR` times longer, up to
`MAX_DELAY`: an answer that is already on its way is picked up within a tenth of a second, and a
long wait (an institution training) costs about one request a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIRST_DELAY = 0.05
FACTOR = 1.5
MAX_DELAY = 1.0


@dataclass
class Backoff:
    """The delays between polls: `next()` for the wait before the next one, `reset()` when a poll got something."""

    first: float = FIRST_DELAY
    factor: float = FACTOR
    cap: float = MAX_DELAY
    _delay: float = field(default=0.0, init=False)

    def reset(self) -> None:
        self._delay = 0.0

    def next(self) -> float:
        self._delay = self.first if self._delay == 0.0 else min(self._delay * self.factor, self.cap)
        return self._delay
