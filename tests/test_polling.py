"""The short, backing-off polls of a deployed round (common/polling.py, server/polling.py,
client/supernode.py): they keep the reply timeout and the instructions' time to live, and the
`pace = "flower"` switch restores Flower's own waits on both sides."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import PullObjectResponse  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import PullAppMessagesResponse  # pylint: disable=no-name-in-module
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from client import supernode
from client.daemon import NodeSettings, gate_command, supernode_command
from common.config import DEFAULT_PACE, JobConfig
from common.flower_patch import OBJECT_PULLS
from common.polling import BUSY_DELAY, BUSY_SECONDS, FACTOR, FIRST_DELAY, MAX_DELAY, Backoff
from server.coordinator import superlink_command
from server import polling
from server.polling import PollingGrid, waiting_grid
from server.reply_parts import PULL_MESSAGES, HttpReplies, WholeReplies, replies_of
from server.round_log import DROPOUTS, RecordingGrid, RoundLog


@pytest.fixture(autouse=True)
def flower_task():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


class SlowGrid:
    """Flower's Grid as PollingGrid uses it: each node's reply is ready `delays[node]` s after the
    push (never, for a node not in `delays`), and each pull hands out a reply once."""

    def __init__(self, delays: dict[int, float]):
        self.delays, self.pushed, self.pulls, self.ready = delays, [], 0, {}

    def push_messages(self, messages):
        pushed_at, ids = time.monotonic(), []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"ins-{number}"
            self.pushed.append(message)
            if message.metadata.dst_node_id in self.delays:
                self.ready[message.metadata.message_id] = (pushed_at + self.delays[message.metadata.dst_node_id],
                                                          Message(RecordDict(), reply_to=message))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [key for key in message_ids if key in self.ready and self.ready[key][0] <= time.monotonic()]
        return [self.ready.pop(key)[1] for key in due]


def instruction(node: int) -> Message:
    return Message(RecordDict({"fitins.config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train",
                   group_id="2")


def test_backoff_starts_short_grows_to_its_cap_and_starts_over_after_activity():
    now = [100.0]
    backoff = Backoff(clock=lambda: now[0])
    delays = [backoff.next() for _ in range(20)]
    assert delays[0] == FIRST_DELAY and delays == sorted(delays) and delays[-1] == MAX_DELAY
    backoff.reset()
    assert backoff.next() == FIRST_DELAY
    busy = [backoff.next() for _ in range(20)]  # soon after activity: the next exchange is near
    assert busy == sorted(busy) and busy[-1] == BUSY_DELAY < MAX_DELAY
    now[0] += BUSY_SECONDS
    assert [backoff.next() for _ in range(20)][-1] == MAX_DELAY  # idle a while: about one poll a second


def test_replies_are_picked_up_soon_after_they_arrive_and_the_timeout_still_ends_the_wait():
    """Node 7 replies after 0.3 s, node 8 never: the round ends at its timeout with node 7's reply,
    and each instruction lived only as long as the coordinator waited for it."""
    inner = SlowGrid({7: 0.3})
    started = time.monotonic()
    replies = RecordingGrid(PollingGrid(inner), RoundLog(), timeout=1.0).send_and_receive(
        [instruction(7), instruction(8)])
    waited = time.monotonic() - started
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["ins-0"]
    assert 1.0 <= waited < 1.5  # not a 3 s sleep past the timeout
    assert inner.pulls > 3  # Flower's Grid would have pulled once in that second
    assert [message.metadata.ttl for message in inner.pushed] == [1.0, 1.0]


def test_the_wait_ends_as_soon_as_every_reply_is_in():
    inner = SlowGrid({7: 0.1, 8: 0.2})
    started = time.monotonic()
    replies = PollingGrid(inner).send_and_receive([instruction(7), instruction(8)], timeout=30.0)
    assert len(replies) == 2 and time.monotonic() - started < 1.0


class BlockingGrid(SlowGrid):
    """Its first pull blocks for `block` s, as Flower's does while it retries a reply's missing parts."""

    def __init__(self, delays: dict[int, float], block: float):
        super().__init__(delays)
        self.block = block

    def pull_messages(self, message_ids):
        first = self.pulls == 0
        replies = super().pull_messages(message_ids)  # what was there when the pull began
        if first:
            time.sleep(self.block)
        return replies


def test_a_reply_that_arrived_during_a_pull_past_the_deadline_is_still_taken():
    """Regression (test_daemon_kill, seed 692477): one institution's half-uploaded reply held a pull
    past the round's timeout; the other's reply landed meanwhile and was never pulled, so its
    release was spent but not aggregated."""
    inner = BlockingGrid({7: 0.1}, block=0.6)
    replies = PollingGrid(inner).send_and_receive([instruction(7), instruction(8)], timeout=0.3)
    assert [reply.metadata.reply_to_message_id for reply in replies] == ["ins-0"]
    assert inner.pulls == 2


class RuntimeLink:
    """The SuperLink's Runtime API as Flower's HTTP Grid pulls replies from it: a node's reply is handed
    out once, `ready[node]` s after the push; its parts arrive one every `upload[node]` s after that
    (None: never, its sender was killed mid-upload; a node not in `upload`: all at once)."""

    def __init__(self, ready: dict[int, float], upload: dict[int, float | None]):
        self.ready, self.upload, self.held, self.parts, self.confirmed = ready, upload, {}, {}, {}

    def push(self, instructions: list[Message]) -> list[str]:
        pushed_at = time.monotonic()
        for number, message in enumerate(instructions):
            message.metadata.__dict__["_message_id"] = f"ins-{number}"
            node = message.metadata.dst_node_id
            reply = Message(RecordDict({"update": ArrayRecord([np.full(1000, float(node))])}), reply_to=message)
            reply.metadata.__dict__["_message_id"] = reply.object_id
            every = self.upload.get(node, 0.0)
            for count, (object_id, part) in enumerate(get_all_nested_objects(reply).items(), start=1):
                due = float("inf") if every is None else pushed_at + self.ready[node] + count * every
                self.parts[object_id] = (due, part.deflate())
            self.held[message.metadata.message_id] = (pushed_at + self.ready[node], reply)
        return [message.metadata.message_id for message in instructions]

    def PullMessages(self, request):  # pylint: disable=invalid-name
        due = [key for key in request.message_ids if key in self.held and self.held[key][0] <= time.monotonic()]
        replies = [self.held.pop(key)[1] for key in due]  # the SuperLink forgets what it hands out
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(reply)) for reply in replies],
            message_object_trees=[get_object_tree(reply) for reply in replies])

    def PullObject(self, request):  # pylint: disable=invalid-name
        due, content = self.parts[request.object_id]
        there = due <= time.monotonic()
        return PullObjectResponse(object_found=True, object_available=there, object_content=content if there else b"")

    def ConfirmMessageReceived(self, request):  # pylint: disable=invalid-name
        self.confirmed[request.message_object_id] = time.monotonic()
        return ConfirmMessageReceivedResponse()


def pull_from(link: RuntimeLink, timeout: float, monkeypatch) -> tuple[dict[str, Message], RoundLog, float]:
    """Nodes 7 and 8 asked through Flower's own HTTP Grid talking to `link`, as the ServerApp asks
    them (with its shortened retries, undone afterwards): the replies by instruction, the round log
    and the seconds it took."""
    for name in OBJECT_PULLS:
        function = getattr(inflatable_utils, name)
        monkeypatch.setattr(function, "__kwdefaults__", dict(function.__kwdefaults__))
    grid = HttpGrid(token="coordinator")
    grid._client = link  # pylint: disable=protected-access
    grid.set_run(Run.create_empty(run_id=1))
    grid.push_messages = link.push
    waiting = waiting_grid(grid, "fast")
    assert isinstance(waiting.replies, HttpReplies)
    round_log, started = RoundLog(), time.monotonic()
    got = RecordingGrid(waiting, round_log, timeout=timeout).send_and_receive([instruction(7), instruction(8)])
    return {reply.metadata.reply_to_message_id: reply for reply in got}, round_log, time.monotonic() - started


def update_of(reply: Message) -> list[float]:
    assert not reply.has_error(), reply.error
    return reply.content.array_records["update"].to_numpy_ndarrays()[0].tolist()


@pytest.mark.parametrize("second_reply_after", [0.0, 0.3], ids=["taken-together", "taken-later"])
def test_a_reply_whose_parts_never_come_holds_up_no_other(monkeypatch, second_reply_after):
    """Regression (test_daemon_kill, seed 554580): node 7 was killed while uploading its reply, so
    its parts never come. Node 8's whole reply must still be fetched at once, not after Flower's
    patience for node 7's (there: past its time to live, and recorded as lost too); node 7's is
    given up once its parts have stopped coming past the deadline, as a reply lost in transit."""
    monkeypatch.setattr(polling, "STALLED_UPLOAD", 0.5)
    link = RuntimeLink(ready={7: 0.0, 8: second_reply_after}, upload={7: None})
    started = time.monotonic()
    replies, round_log, waited = pull_from(link, 2.0, monkeypatch)
    assert update_of(replies["ins-1"]) == [8.0] * 1000
    assert link.confirmed[replies["ins-1"].metadata.message_id] - started < 1.5  # long before the deadline
    assert replies["ins-0"].has_error() and replies["ins-0"].error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert round_log.dropped == {2: {"node 7": DROPOUTS[ErrorCode.MESSAGE_UNAVAILABLE]}}
    assert 2.0 <= waited < 2.0 + 0.5 + 1.5  # the deadline, then a stalled upload's patience


def test_a_reply_whose_parts_keep_coming_past_the_deadline_is_still_taken(monkeypatch):
    """Node 7's reply reached the SuperLink in time; its five parts come one every 0.3 s, the last
    well past the 0.5 s deadline but never a second after the one before: it is fetched whole."""
    monkeypatch.setattr(polling, "STALLED_UPLOAD", 1.0)
    replies, round_log, waited = pull_from(RuntimeLink(ready={7: 0.1, 8: 0.0}, upload={7: 0.3}), 0.5, monkeypatch)
    assert update_of(replies["ins-0"]) == [7.0] * 1000 and update_of(replies["ins-1"]) == [8.0] * 1000
    assert not round_log.dropped and waited > 1.5


def test_a_grid_of_other_code_is_pulled_as_flower_pulls_it(monkeypatch):
    grid = HttpGrid(token="coordinator")
    monkeypatch.setitem(PULL_MESSAGES, "pull_messages", "0" * 64)
    replies, reason = replies_of(grid)
    assert isinstance(replies, WholeReplies) and "pull_messages changed in HttpGrid" in reason
    assert isinstance(replies_of(SlowGrid({}))[0], WholeReplies)  # the simulation's: replies come whole


def test_the_flower_switch_restores_flowers_waits_on_both_sides(tmp_path: Path):
    flower_grid = SlowGrid({})
    assert waiting_grid(flower_grid, "flower") is flower_grid
    assert isinstance(waiting_grid(flower_grid, "fast"), PollingGrid)
    assert JobConfig().federation.pace == DEFAULT_PACE == "fast"

    def node(pace: str) -> NodeSettings:
        return NodeSettings(superlink="127.0.0.1:9092", data=tmp_path / "d.csv", name="alpha", state_dir=tmp_path,
                            root_certificates=None, private_key=None, dataset_id="d", model_dir=tmp_path,
                            model_sha256="0" * 64, pace=pace)

    assert Path(supernode_command(node("flower"))[0]).name == "flower-supernode"
    assert supernode_command(node("fast"))[1:3] == ["-m", "client.supernode"]
    gate = gate_command(node("flower"), 1)
    assert gate[gate.index("--pace") + 1] == "flower"
    assert gate[gate.index("--model-dir") + 1] == str(tmp_path)  # whose code warm ClientApps find loaded
    for pace in ("flower", "fast"):  # the coordinator's SuperLink: its chores (server/link_chores.py)
        ours = superlink_command(tmp_path, "127.0.0.1", 9093, "127.0.0.1:9092", None, pace)
        assert ours[ours.index("--pace") + 1] == pace and ours.index("--pace") < ours.index("--")
    default = superlink_command(tmp_path, "127.0.0.1", 9093, "127.0.0.1:9092", None)
    assert default[default.index("--pace") + 1] == DEFAULT_PACE


def test_the_patched_supernode_polls_soon_after_a_message_and_backs_off_while_idle():
    slept: list[float] = []
    pulled = iter([None, None, 5, None, None])
    module = SimpleNamespace(_pull_and_store_message=lambda **_: next(pulled), time=time)
    clock = supernode.patch(module, sleep=slept.append)
    assert module.time is clock
    for _ in range(5):
        if module._pull_and_store_message() is None:
            module.time.sleep(supernode.IDLE_SLEEP)  # as Flower's loop does when nothing came
    module.time.sleep(supernode.REPLY_SLEEP)  # waiting for the ClientApp's reply
    assert slept[:2] == slept[2:4] == [FIRST_DELAY, FIRST_DELAY * FACTOR]  # message 5 started it over
    assert slept[4] == supernode.REPLY_POLL
    assert module.time.time() > 0  # the rest of `time` is the real one

