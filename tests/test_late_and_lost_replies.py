"""Replies that come late or never: deadlines, dropouts, and a SuperNode stuck on a lost reply.

The real-process side of these (ClientApps killed at random moments) is tests/test_daemon_kill.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from flwr.app import ConfigRecord, Error, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from client.round import check_deadline
from client.watchdog import CLIENTAPP_DIED, SENDING, STUCK_AFTER, ReplyWatch
from common import messages as m
from common.config import REPO_ROOT
from server.report import privacy_report, render_privacy_markdown
from server.round_log import InstitutionFailed, RecordingGrid, RoundLog


@pytest.fixture(autouse=True)
def flower_task():
    """Flower stamps every Message with the task it runs in; out of a run, say which."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def train_message(node: int) -> Message:
    return Message(RecordDict({"fitins.config": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train",
                   group_id="3")


def from_flower(about: Message, code: int) -> Message:
    """An error reply Flower writes itself: the SuperLink for an offline node, the Grid for a reply
    whose weights never arrived (no round in it: the regression behind this helper)."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=SUPERLINK_NODE_ID,
                        reply_to_message_id=about.metadata.message_id, group_id="",
                        created_at=time.time(), ttl=10.0, message_type=about.metadata.message_type)
    return make_message(metadata=metadata, error=Error(code=code, reason="from the SuperLink"))


class ScriptedGrid:
    """Flower's Grid as the workflow sees it: ids the instructions, answers as scripted per node."""

    def __init__(self, answer):
        self.answer, self.sent = answer, []

    def send_and_receive(self, messages, *, timeout):
        replies = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"ins-{number}"
            self.sent.append(message)
            replies.append(self.answer(message))
        return replies


def test_each_instruction_lives_only_as_long_as_the_coordinator_waits_for_its_reply():
    grid = ScriptedGrid(lambda message: Message(RecordDict(), reply_to=message))
    RecordingGrid(grid, RoundLog(), timeout=45.0).send_and_receive([train_message(7), train_message(8)])
    assert [message.metadata.ttl for message in grid.sent] == [45.0, 45.0]  # Flower's default: 12 hours


def test_a_lost_reply_is_a_dropout_named_in_the_round_log_not_a_failed_job():
    def answer(message: Message) -> Message:
        if message.metadata.dst_node_id == 7:
            metrics = ConfigRecord({m.INSTITUTION: "alpha"})
            return Message(RecordDict({m.FIT_METRICS: metrics}), reply_to=message)
        if message.metadata.dst_node_id == 8:
            return from_flower(message, ErrorCode.NODE_UNAVAILABLE)
        if message.metadata.dst_node_id == 9:
            return from_flower(message, ErrorCode.MESSAGE_UNAVAILABLE)
        return Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason="killed"), reply_to=message)

    round_log = RoundLog(node_names={8: "beta", 9: "gamma"})
    RecordingGrid(ScriptedGrid(answer), round_log, timeout=45.0).send_and_receive(
        [train_message(node) for node in (7, 8, 9, 10)]
    )
    assert set(round_log.replies[3]) == {"alpha"}
    # Flower's own replies come from the SuperLink and name no round: the instruction does.
    assert round_log.dropped[3] == {"beta": "went offline", "gamma": "its reply was lost in transit",
                                    "node 10": "its training process died"}


def test_an_institution_whose_clientapp_raised_stops_the_job_with_its_reason():
    grid = ScriptedGrid(lambda message: Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="KeyError: 'text'"), reply_to=message))
    with pytest.raises(InstitutionFailed, match="KeyError: 'text'"):
        RecordingGrid(grid, RoundLog(), timeout=45.0).send_and_receive([train_message(7)])


def test_an_institution_declines_a_round_whose_deadline_passed_as_a_decline_the_coordinator_reads():
    fresh = train_message(7)
    fresh.metadata.ttl = 45.0
    check_deadline(fresh, 3)
    late = train_message(7)
    late.metadata.ttl = 45.0
    late.metadata.__dict__["_created_at"] = time.time() - 50
    with pytest.raises(m.Refused) as declined:
        check_deadline(late, 3)
    assert declined.value.reason == m.Reason.DEADLINE_PASSED and "passed 5 s ago" in declined.value.detail
    reason = m.Refusal("alpha", declined.value.reason).encode()
    round_log = RoundLog()
    RecordingGrid(ScriptedGrid(lambda message: Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                                       reply_to=message)), round_log, timeout=45.0).send_and_receive([late])
    assert round_log.declined == {3: {"alpha": "deadline-passed"}}  # a decline: the job goes on


def test_watchdog_says_stuck_only_for_a_reply_whose_clientapp_died_handing_it_over():
    def watch(*events: tuple[float, str]) -> ReplyWatch:
        seen = ReplyWatch()
        for at, line in events:
            seen.saw(line, at)
        return seen

    died = f"fedtune-client: bundle gate: {CLIENTAPP_DIED} (pid 4242, killed by signal 9)"
    sending = f"INFO :      {SENDING}train message (ID: 3f2a)"
    # Killed between handing over the message and its weights: the SuperNode waits forever.
    stuck = watch((100.0, sending), (100.8, died))
    assert not stuck.stuck(100.8 + STUCK_AFTER - 1) and stuck.stuck(100.8 + STUCK_AFTER + 1)
    # Its death noticed just before the SuperNode picked the reply up: the same reply.
    assert watch((100.0, died), (101.0, sending)).stuck(101.0 + STUCK_AFTER + 1)
    # Killed mid-training: Flower answers with an error a minute later, which leaves.
    assert not watch((100.0, died), (163.0, sending), (163.2, "INFO :      Sent successfully")).stuck(1000.0)
    # ... and even before that answer has left, its send is not the dead ClientApp's.
    assert not watch((100.0, died), (163.0, sending)).stuck(163.0 + STUCK_AFTER + 1)
    # A long upload whose ClientApp finished normally is left alone.
    assert not watch((100.0, sending)).stuck(100.0 + 10 * STUCK_AFTER)


def test_gate_names_a_clientapp_that_was_killed_and_not_one_that_ended_on_its_own():
    # Not waited for here: as with Flower's launcher, the gate is the one to collect them.
    script = textwrap.dedent("""
        import signal, subprocess, time
        from client.gate import report_exits
        finished, failed = subprocess.Popen(["true"]), subprocess.Popen(["false"])
        killed = subprocess.Popen(["sleep", "30"])
        killed.send_signal(signal.SIGKILL)
        time.sleep(1)
        report_exits()
        print("pids", finished.pid, failed.pid, killed.pid)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    said, pids = result.stdout.split("pids ")
    killed = pids.split()[2]
    assert said.splitlines() == [f"fedtune-client: bundle gate: {CLIENTAPP_DIED} (pid {killed}, killed by signal 9)"]


def test_a_dropout_is_named_in_the_privacy_report_with_what_its_ledger_counts():
    metrics = {
        "secure_aggregation": False, "institution_dp": {"enabled": False}, "config": {"federation": {"rounds": 1}},
        "institutions": [], "rounds": [{"round": 1, "declined": {}, "dropped": {"alpha": "its reply was lost in transit"}}],
    }
    report = privacy_report(metrics)
    assert report["dropped"] == {"1": {"alpha": "its reply was lost in transit"}}
    assert ("- Round 1: alpha dropped out (its reply was lost in transit); its ledger counts whatever it released "
            "for the round, aggregated or not.") in render_privacy_markdown(report)


def test_an_admitted_institution_cannot_report_under_another_name():
    """A reply's own name for its sender is only a fallback: reports name admitted nodes as admitted."""
    def answer(message: Message) -> Message:
        metrics = ConfigRecord({m.INSTITUTION: "st-john"})  # node 7 is st-mary, claiming to be st-john
        return Message(RecordDict({m.FIT_METRICS: metrics}), reply_to=message)

    round_log = RoundLog(node_names={7: "st-mary"})
    RecordingGrid(ScriptedGrid(answer), round_log, timeout=45.0).send_and_receive([train_message(7)])
    assert set(round_log.replies[3]) == {"st-mary"}
