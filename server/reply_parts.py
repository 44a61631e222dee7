"""Each reply's parts fetched on their own, so that one broken upload cannot hold up the others.

Flower 1.39's `HttpGrid.pull_messages` takes every reply the SuperLink holds (the SuperLink forgets
each one as it hands it out), then fetches their parts one reply after another, each with Flower's
patience (up to two hours). An institution killed while uploading leaves a reply whose parts never
come, and every reply taken with it or after it waited behind it: in test_daemon_kill (seed 554580)
the other institution's whole reply was fetched only after its time to live and recorded as lost.

`HttpReplies` makes the requests of Flower's `pull_messages` in two steps: `take` asks the SuperLink
for the replies that are in, `fetch` gets one reply's parts (server/polling.py runs one fetch per
reply, side by side). A fetch can be given up (`Reply.give_up`): the reply then comes back as the
error Flower itself writes for parts that never came, which the round log records as lost in
transit. `WholeReplies` serves a Grid whose replies come whole (the simulation's in-memory Grid,
and Flower's HTTP Grid when its `pull_messages` is not the code pinned here): `take` is its
`pull_messages`, `fetch` has nothing left to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import ERROR
from typing import Any

import httpx
from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, inflate_object_from_contents, pull_objects
from flwr.superlink.grid.http_grid import ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE, HttpGrid

from common.flower_patch import mismatch

# The Flower code whose requests `HttpReplies` repeats, step by step.
PULL_MESSAGES = {"pull_messages": "67a5266a5a2ed51557437a15ef4c8844f46576bc5bb6b0753d2a2f6230a3aa83"}


@dataclass
class Reply:
    """A reply the SuperLink handed out, its parts perhaps still to come."""

    reply_to: str  # the id of the instruction it answers
    body: Any  # HttpReplies: (message, object tree) as protobufs; WholeReplies: the Message
    moved: float = field(default_factory=time.monotonic)  # when it was taken, or its latest part came
    _given_up: threading.Event = field(default_factory=threading.Event)

    def give_up(self) -> None:
        self._given_up.set()

    @property
    def given_up(self) -> bool:
        return self._given_up.is_set()


class WholeReplies:
    def __init__(self, grid: Grid):
        self.grid = grid

    def take(self, message_ids: Iterable[str]) -> list[Reply]:
        return [Reply(message.metadata.reply_to_message_id, message)
                for message in self.grid.pull_messages(message_ids)]

    def fetch(self, reply: Reply) -> Message:
        return reply.body


class HttpReplies:
    """Flower's `HttpGrid.pull_messages`, split into the one request and each reply's parts."""

    def __init__(self, grid: HttpGrid):
        self.grid = grid

    def take(self, message_ids: Iterable[str]) -> list[Reply]:
        try:
            # pylint: disable-next=protected-access
            pulled = self.grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
        except httpx.HTTPStatusError as error:
            if error.response.status_code != httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                raise
            log(ERROR, ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE)
            return []
        return [Reply(proto.metadata.reply_to_message_id, (proto, tree))
                for proto, tree in zip(pulled.messages_list, pulled.message_object_trees, strict=True)]

    def fetch(self, reply: Reply) -> Message:
        """The reply whole, or Flower's error for its parts if they cannot be had or `reply` is given up."""
        proto, tree = reply.body
        client, run_id, message_id = self.grid._runtime_client, self.grid.run.run_id, proto.metadata.message_id  # pylint: disable=protected-access
        flower_pull = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=self.grid.node,
                                                   run_id=run_id)

        def pull_object(object_id: str) -> bytes:
            if reply.given_up:
                raise ObjectPullError(object_id, "given up: its parts stopped coming after the deadline")
            content = flower_pull(object_id)
            reply.moved = time.monotonic()
            return content

        try:
            contents = pull_objects(object_ids=[node.object_id for node in iterate_object_tree(tree)],
                                    pull_object_fn=pull_object)
        except ObjectPullError as error:
            return self._unavailable(reply, run_id, error)
        client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=self.grid.node, run_id=run_id,
                                                                    message_object_id=message_id))
        message = inflate_object_from_contents(message_id, contents)
        message.metadata.__dict__["_message_id"] = message_id  # as Flower's pull sets it
        return message

    def _unavailable(self, reply: Reply, run_id: int, error: ObjectPullError) -> Message:
        """The reply Flower writes when a reply's parts never came."""
        node = self.grid.node.node_id
        metadata = Metadata(run_id=run_id, message_id="", src_node_id=node, dst_node_id=node,
                            message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0, reply_to_message_id=reply.reply_to,
                            created_at=now().timestamp())
        reason = ("Reply message objects are unavailable. The sender may not have completed the upload before "
                  f"the object-push session expired. {error}")
        return make_message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason))


def replies_of(grid: Grid) -> tuple[WholeReplies | HttpReplies, str | None]:
    """How `grid`'s replies are taken: apart from their parts for Flower's HTTP Grid when its code is the
    pinned one, whole otherwise; and why not apart, where it is an HTTP Grid of other code."""
    if not isinstance(grid, HttpGrid):
        return WholeReplies(grid), None
    reason = mismatch(HttpGrid, PULL_MESSAGES)
    return (WholeReplies(grid), reason) if reason else (HttpReplies(grid), None)
