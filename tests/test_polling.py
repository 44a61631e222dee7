"""The short, backing-off polls of a deployed round (common/polling.py, server/polling.py,
client/supernode.py): they keep the reply timeout and the instructions' time to live, and the
`pace = "flower"` switch restores Flower's own waits on both sides."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import supernode
from client.daemon import NodeSettings, gate_command, supernode_command
from common.config import DEFAULT_PACE, JobConfig
from common.polling import BUSY_DELAY, BUSY_SECONDS, FACTOR, FIRST_DELAY, MAX_DELAY, Backoff
from server.coordinator import superlink_command
from server.polling import PollingGrid, waiting_grid
from server.round_log import RecordingGrid, RoundLog


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

