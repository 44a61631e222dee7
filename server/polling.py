"""The coordinator's Grid, waiting for replies on a short, backing-off poll instead of Flower's 3 s.

Flower 1.39's `HttpGrid.send_and_receive` pushes the instructions, then pulls and sleeps 3 s
until every reply is in or the timeout has passed; a SecAgg+ round makes four such exchanges.
`PollingGrid` does the same with Flower's public `push_messages` / `pull_messages`, waiting
`common.polling.Backoff` between pulls (reset whenever a pull brought replies), and never past the
timeout. With `federation.pace = "flower"` the ServerApp keeps Flower's Grid as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import Pace
from common.flower_patch import shorten_object_pulls
from common.polling import Backoff
from server.grid_decorator import GridDecorator


class PollingGrid(GridDecorator):
    """Flower's Grid with `send_and_receive` polling on `Backoff`; everything else passes through."""

    def __init__(self, grid: Grid, sleep=time.sleep):
        super().__init__(grid)
        self.sleep = sleep

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """As Flower's: the replies that came before `timeout` seconds passed (None: wait for all).

        Unlike Flower's, its last pull starts once the deadline has passed: a pull can take
        long (Flower retries a reply's missing parts inside it), and a reply that reached the
        SuperLink meanwhile was sent in time; left unpulled, an institution's release would be
        spent but never aggregated.
        """
        waiting = set(self.grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        backoff = Backoff()
        backoff.reset()  # the push is the activity: replies to light exchanges come within a second
        replies: list[Message] = []
        while True:
            pulled_at = time.time()
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (timeout is not None and pulled_at >= end):
                return replies
            if pulled:
                backoff.reset()
            delay = backoff.next()
            self.sleep(delay if timeout is None else max(0.0, min(delay, end - time.time())))


def waiting_grid(grid: Grid, polling: Pace) -> Grid:
    """The Grid the workflow waits on: `PollingGrid` retrying a reply's parts soon
    (`common.flower_patch.shorten_object_pulls`), or Flower's own for `polling = "flower"`."""
    if polling == "flower":
        return grid
    reason = shorten_object_pulls()
    if reason is not None:
        log(WARNING, "the coordinator retries a reply's parts at Flower's pace (1 s and more): %s", reason)
    return PollingGrid(grid)
