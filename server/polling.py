"""The coordinator's Grid, waiting for replies on a short, backing-off poll instead of Flower's 3 s.

Flower 1.39's `HttpGrid.send_and_receive` pushes the instructions, then pulls and sleeps 3 s
until every reply is in or the timeout has passed; a SecAgg+ round makes four such exchanges.
`PollingGrid` does the same with Flower's public `push_messages` and the replies' two steps of
server/reply_parts.py (take what is in; fetch each reply's parts in a thread of its own), waiting
`common.polling.Backoff` between pulls (reset whenever a pull brought replies), and never past the
timeout. With `federation.pace = "flower"` the ServerApp keeps Flower's Grid as it is.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from common.config import Pace
from common.flower_patch import shorten_object_pulls
from common.polling import BUSY_DELAY, STALLED_UPLOAD, Backoff
from server.grid_decorator import GridDecorator
from server.reply_parts import HttpReplies, Reply, WholeReplies, replies_of


class PollingGrid(GridDecorator):
    """Flower's Grid with `send_and_receive` polling on `Backoff`; everything else passes through."""

    def __init__(self, grid: Grid, replies: WholeReplies | HttpReplies | None = None):
        super().__init__(grid)
        self.replies = replies or WholeReplies(grid)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """As Flower's: the replies that came before `timeout` seconds passed (None: wait for all).

        Unlike Flower's, its last pull starts once the deadline has passed, and a reply taken by
        then is fetched while its parts keep coming (given up after `STALLED_UPLOAD` s without
        one): a reply that reached the SuperLink in time was sent in time; left unfetched, an
        institution's release would be spent but never aggregated. A reply whose parts never come
        holds up no other: each is fetched on its own.
        """
        waiting = set(self.grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        backoff = Backoff()
        backoff.reset()  # the push is the activity: replies to light exchanges come within a second
        replies: list[Message] = []
        fetching: dict[Future, Reply] = {}
        with ThreadPoolExecutor(max_workers=max(1, len(waiting)), thread_name_prefix="reply-parts") as pool:
            try:
                while True:
                    pulled_at = time.time()
                    asked = waiting - {reply.reply_to for reply in fetching.values()}
                    taken = self.replies.take(asked) if asked else []
                    fetching.update({pool.submit(self.replies.fetch, reply): reply for reply in taken})
                    replies += _fetched(fetching, waiting)
                    if not waiting or (timeout is not None and pulled_at >= end):
                        break
                    if taken:
                        backoff.reset()
                    delay = backoff.next()
                    _wait(fetching, delay if timeout is None else max(0.0, min(delay, end - time.time())))
                while fetching:  # past the deadline: what was taken in time, while its parts keep coming
                    for reply in fetching.values():
                        if time.monotonic() - reply.moved > STALLED_UPLOAD:
                            reply.give_up()
                    _wait(fetching, BUSY_DELAY)
                    replies += _fetched(fetching, waiting)
            finally:
                for reply in fetching.values():  # only when a fetch failed: the pool then waits for no other
                    reply.give_up()
        return replies


def _wait(fetching: dict[Future, Reply], seconds: float) -> None:
    """Sleep `seconds`, or less when a fetch finishes first."""
    if fetching:
        wait(fetching, timeout=seconds, return_when=FIRST_COMPLETED)
    else:
        time.sleep(seconds)


def _fetched(fetching: dict[Future, Reply], waiting: set[str]) -> list[Message]:
    """The replies whose fetch has finished, taken out of `fetching` and their instructions out of `waiting`."""
    done = [future for future in fetching if future.done()]
    for future in done:
        del fetching[future]
    messages = [future.result() for future in done]
    waiting.difference_update(message.metadata.reply_to_message_id for message in messages)
    return messages


def waiting_grid(grid: Grid, polling: Pace) -> Grid:
    """The Grid the workflow waits on: `PollingGrid` retrying a reply's parts soon
    (`common.flower_patch.shorten_object_pulls`) and fetching each reply on its own
    (server/reply_parts.py), or Flower's own for `polling = "flower"`."""
    if polling == "flower":
        return grid
    reason = shorten_object_pulls()
    if reason is not None:
        log(WARNING, "the coordinator retries a reply's parts at Flower's pace (1 s and more): %s", reason)
    replies, reason = replies_of(grid)
    if reason is not None:
        log(WARNING, "the coordinator fetches replies one after another, as Flower does: %s", reason)
    return PollingGrid(grid, replies)
