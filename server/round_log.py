"""What crossed the wire in each round, recorded where the ServerApp meets Flower's Grid.

Flower's workflows aggregate; a privacy report needs per-institution facts, and with SecAgg+ a
round is four exchanges whose traffic no strategy sees whole. `RecordingGrid` sits between the
workflow and the real Grid: it counts the bytes of every message to and from each node, keeps
the metrics each institution reports with its (masked or plain) update, logs declined rounds
and dropouts, and stops the job when an institution fails for any other reason instead of
letting the workflow carry on silently with fewer updates.

It also gives each instruction a time to live equal to the reply timeout. Flower's default is
12 hours: a node that comes back late would still be handed the round, and an institution
would spend privacy budget on an update the coordinator has stopped waiting for.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from common import messages as m
from server.grid_decorator import GridDecorator

# Errors Flower reports when a reply was lost rather than refused: the node went offline, its
# ClientApp process died (killed, out of memory), or its upload never completed. The round goes
# on without that institution, as it would after a timeout; the report names it.
DROPOUTS = {
    ErrorCode.NODE_UNAVAILABLE: "went offline",
    ErrorCode.CLIENT_APP_CRASHED: "its training process died",
    ErrorCode.MESSAGE_UNAVAILABLE: "its reply was lost in transit",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "its reply expired",
}


class InstitutionFailed(RuntimeError):
    """An institution replied with an error; the job stops with its reason."""


def content_bytes(content: RecordDict) -> int:
    """Payload bytes of a message: weights, masked vectors, keys and shares, metrics.

    Counted here rather than with Flower's `ConfigRecord.count_bytes`, which fails on the empty
    lists SecAgg+ sends (flwr 1.39: IndexError).
    """
    total = sum(record.count_bytes() for record in content.array_records.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        total += sum(len(key) + _value_bytes(value) for key, value in record.items())
    return total


def _value_bytes(value) -> int:
    if isinstance(value, list):
        return sum(map(_value_bytes, value))
    return len(value) if isinstance(value, (str, bytes)) else 8  # numbers travel as 64 bits


@dataclass
class RoundLog:
    """Per round: what each institution reported and sent, keyed by institution name."""

    replies: dict[int, dict[str, dict]] = field(default_factory=dict)
    declined: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> institution -> Reason code
    dropped: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> institution -> what happened
    # round -> institution, or "aggregate" for the SecAgg+ sum -> server.update_checks.Rejection code
    rejected: dict[int, dict[str, str]] = field(default_factory=dict)
    node_bytes: dict[int, dict[int, list[int]]] = field(default_factory=dict)  # round -> node -> [down, up]
    node_names: dict[int, str] = field(default_factory=dict)

    def count(self, server_round: int, node_id: int, down: int = 0, up: int = 0) -> None:
        sent = self.node_bytes.setdefault(server_round, {}).setdefault(node_id, [0, 0])
        sent[0] += down
        sent[1] += up

    def bytes_of(self, server_round: int, name: str) -> tuple[int, int]:
        """(down, up) bytes of every exchange with institution `name` in a round."""
        nodes = [node for node, known in self.node_names.items() if known == name]
        sent = [self.node_bytes.get(server_round, {}).get(node, [0, 0]) for node in nodes]
        return sum(s[0] for s in sent), sum(s[1] for s in sent)

    def reject(self, server_round: int, who: str, reason: str) -> None:
        """The coordinator's checks refused an institution's update, or the SecAgg+ sum ("aggregate")."""
        self.rejected.setdefault(server_round, {})[who] = str(reason)

    def name_of(self, node_id: int) -> str:
        return self.node_names.get(node_id, f"node {node_id}")

    def institutions(self) -> list[str]:
        """Everyone who replied or declined, including institutions that declined every round."""
        named = {name for replies in self.replies.values() for name in replies}
        named |= {name for declined in self.declined.values() for name in declined}
        return sorted(named)


class RecordingGrid(GridDecorator):
    """A Grid that records each exchange into a `RoundLog` and enforces a reply timeout."""

    def __init__(self, grid: Grid, round_log: RoundLog, timeout: float):
        super().__init__(grid)
        self.round_log, self.timeout = round_log, timeout

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            message.metadata.ttl = min(message.metadata.ttl, timeout or self.timeout)
            self.round_log.count(int(message.metadata.group_id), message.metadata.dst_node_id,
                                 down=content_bytes(message.content))
        replies = list(self.grid.send_and_receive(messages, timeout=timeout or self.timeout))
        # Flower's Grid gives each instruction its id as it sends it. Replies that Flower writes
        # itself (an offline node, a reply lost in transit) name neither the node nor the round:
        # their instruction does.
        instructions = {message.metadata.message_id: message.metadata for message in messages}
        for reply in replies:
            instruction = instructions[reply.metadata.reply_to_message_id]
            self._record(reply, int(instruction.group_id), instruction.dst_node_id)
        return replies

    def _record(self, reply: Message, server_round: int, node: int) -> None:
        if reply.has_error() and reply.error.code in DROPOUTS:
            name = self.round_log.name_of(node)
            log(WARNING, "round %s: %s dropped out: %s", server_round, name, DROPOUTS[reply.error.code])
            self.round_log.dropped.setdefault(server_round, {})[name] = DROPOUTS[reply.error.code]
            return
        if reply.has_error():
            refusal = m.Refusal.decode(reply.error.reason)
            if refusal is None or not refusal.declined:
                raise InstitutionFailed(f"round {server_round}: {m.describe_error(reply.error.reason)}")
            # An admitted institution is known by the name its operator was admitted under.
            name = self.round_log.node_names.setdefault(node, refusal.institution)
            log(WARNING, "round %s: %s", server_round, refusal.sentence)
            self.round_log.declined.setdefault(server_round, {})[name] = refusal.reason.value
            return
        self.round_log.count(server_round, node, up=content_bytes(reply.content))
        if m.FIT_METRICS in reply.content.config_records:  # the reply that carries the update
            metrics = dict(reply.content.config_records[m.FIT_METRICS])
            # An admitted institution is reported under its admitted name, whatever its reply calls it.
            name = self.round_log.node_names.setdefault(node, str(metrics[m.INSTITUTION]))
            self.round_log.replies.setdefault(server_round, {})[name] = metrics
