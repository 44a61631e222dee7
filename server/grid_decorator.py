"""A Grid that hands every call to the Grid it wraps: the base of fedtune's Grid decorators.

`server/round_log.py` (`RecordingGrid`: what crossed the wire, reply deadlines) and
`server/polling.py` (`PollingGrid`: a short poll instead of Flower's 3 s) each override only what
they change, so they stack in any order around Flower's own Grid.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class GridDecorator(Grid):
    def __init__(self, grid: Grid):
        self.grid = grid

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)
