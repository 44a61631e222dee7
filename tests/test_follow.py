"""`fedtune-server submit`/`follow` wait on Flower's log stream, not on a status check every 3 s.

The status was once a `flwr ls` process (about 2 CPU-seconds) every 3 s, which took a sixth of a
2-core machine from the deployed job it waited for (BENCHMARKS.md); it is now asked in process
(server/control.py) when the stream ends and every 30 s.
Flower's answers are stood in for: a real process plays the log stream (it ends when the run does),
`Coordinator.runs` plays `flwr ls`.
"""

from __future__ import annotations

import sys
import time

from server import coordinator as coordinator_module
from server.coordinator import Coordinator


class FlowerStandIn:
    """`flwr log --stream` as a process that ends after `stream_seconds`; `flwr ls` as a status that turns
    finished `finished_after` seconds in, counting how often it was asked."""

    def __init__(self, tmp_path, monkeypatch, stream_seconds: float, finished_after: float):
        script, self.argv = tmp_path / "flwr", tmp_path / "argv"
        script.write_text(f"#!{sys.executable}\nimport sys, time\nopen({str(self.argv)!r}, 'w').write(' '.join(sys.argv[1:]))\n"
                          f"time.sleep({stream_seconds})\n")
        script.chmod(0o700)
        monkeypatch.setattr(coordinator_module, "flower_executable", lambda name: str(script))
        self.started, self.finished_after, self.asked = time.monotonic(), finished_after, 0
        self.seen_finished = None  # seconds in when the follower first saw the run finished
        monkeypatch.setattr(Coordinator, "runs", lambda _self, run_id=None: [self.status()])

    def status(self) -> dict:
        self.asked += 1
        now = time.monotonic() - self.started
        done = now >= self.finished_after
        if done and self.seen_finished is None:
            self.seen_finished = now
        return {"run-id": 7, "status": "finished:completed" if done else "running"}


def test_follow_asks_the_status_when_the_log_stream_ends_not_every_few_seconds(tmp_path, monkeypatch):
    flower = FlowerStandIn(tmp_path, monkeypatch, stream_seconds=4, finished_after=4)
    run = Coordinator(tmp_path / "state").follow("7", show_logs=False, poll=0.1, check=60)
    assert run["status"] == "finished:completed"
    assert flower.seen_finished < 6  # learnt from the stream's end, not from a 60 s check
    assert flower.asked <= 3  # once before waiting, once when the stream ended (and once more if it raced)
    assert flower.argv.read_text() == "log 7 fedtune --stream"


def test_follow_polls_the_status_once_the_log_stream_is_gone_before_the_run_finished(tmp_path, monkeypatch):
    """A broken stream (the SuperLink restarted) must not leave the follower waiting for a 30 s check."""
    flower = FlowerStandIn(tmp_path, monkeypatch, stream_seconds=0, finished_after=1.5)
    run = Coordinator(tmp_path / "state").follow("7", show_logs=False, poll=0.1, check=60)
    assert run["status"] == "finished:completed" and flower.seen_finished < 3
    assert flower.asked >= 3  # polled once the stream had ended


def test_after_a_broken_stream_the_follower_backs_off_to_the_check_interval(tmp_path, monkeypatch):
    """A SuperLink restart mid-job must not bring back a `flwr ls` process every few seconds for the rest of it."""
    flower = FlowerStandIn(tmp_path, monkeypatch, stream_seconds=0, finished_after=6)
    run = Coordinator(tmp_path / "state").follow("7", show_logs=False, poll=0.25, check=2)
    assert run["status"] == "finished:completed"
    assert flower.asked <= 10  # 0.25, 0.5, 1, 2, 2, 2 s apart: not 24 polls at 0.25 s


def test_follow_checks_the_status_every_check_seconds_while_the_stream_runs(tmp_path, monkeypatch):
    """A stream that does not end (hung) still lets the follower see the run finish, within `check` seconds."""
    flower = FlowerStandIn(tmp_path, monkeypatch, stream_seconds=600, finished_after=1.5)
    run = Coordinator(tmp_path / "state").follow("7", show_logs=False, poll=0.1, check=1)
    assert run["status"] == "finished:completed" and flower.seen_finished < 1.5 + 1 + 1
