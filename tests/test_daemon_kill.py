"""Kill the real institution daemon at random moments; its privacy ledger must stay right.

A kill at any moment must never lose a ledger entry for an update the coordinator aggregated, nor
leave one for an update that never left, except the one in flight at each kill (released, then
killed before the bytes left: counted, the safe side). And a restarted daemon keeps what was spent.

Real processes over TLS: the coordinator and two institutions from deployment_support. Flower
starts one ClientApp process per message; that process trains and writes the ledger, so most
kills hit it (the node stays up) and one takes the whole daemon down (supervisor, SuperNode and
everything they started), after which it is restarted on the same state folder. Each job is one
round, so the run folder of a finished job says exactly which updates were aggregated.

Flower's timings shape the test: a killed ClientApp's message is answered only when its task
token expires (an error up to 60 s after its last heartbeat, or a relaunch 30 s after the claim
when it died before pulling the message), and the node handles nothing else until then. A
killed round ends at that error or at the round timeout, set above a normal reply; the killed
institution drops out of it, and each job waits for both nodes to settle before the next one
starts. A ClientApp killed while handing its reply to the SuperNode would leave the SuperNode
waiting forever (Flower 1.39); the daemon's watchdog restarts it (client/watchdog.py), and the
coordinator's job goes on without that reply (tests/test_stuck_reply.py makes that moment
happen on purpose). 5-8 minutes on 2 cores.

FEDTUNE_KILL_SEED=N reruns a given draw of kill moments; the seed is in every assertion message.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from common.accounting import epsilon
from common.processes import FlowerProcess
from common.progress import Follower
from deployment_support import cli, start_institution, tail, write_job

pytestmark = pytest.mark.timeout(900)

SEED = int(os.environ.get("FEDTUNE_KILL_SEED") or random.SystemRandom().randrange(1_000_000))
ROUND_TIMEOUT = 120.0  # per exchange (a SecAgg+ round is four); a round ends when every reply is in
KILLED_ROUND_TIMEOUT = 75.0  # above a normal reply (~30 s idle, ~50 s with the other test worker busy)
LOCAL_EPOCHS = 8  # 24 DP-SGD steps a round on a 120-record slice: about a second of training to land in
# How long a node may take to answer its last message, or to be back after a restart.
SETTLE = 300.0
# The coordinator may wait on a lost reply for Flower's object-push session (180 s) past the round.
SUBMIT_TIMEOUT = 480.0
STARTED = "SuperNode started (pid"  # the daemon's line for each SuperNode it starts
RESTARTED_STUCK = "restarting the SuperNode"  # ... and its watchdog's (client/daemon.py)
# When a kill lands, counted from the killed ClientApp's start ("startup": before it trains),
# its first training step, or its last one; and how long after that.
MOMENTS = {"startup": (0.0, 12.0), "training": (0.0, 0.6), "after training": (0.0, 0.15)}


@dataclass
class Node:
    name: str
    process: FlowerProcess  # `fedtune-client start`
    log: Path
    state: Path

    @property
    def ledger(self) -> Path:
        return self.state / "ledger.sqlite"


@dataclass
class Kill:
    name: str
    job: int
    moment: str
    delay: float
    whole_daemon: bool = False
    then: Callable[[], None] | None = None  # after a whole-daemon kill: the restart
    landed: str = "not yet"

    def __str__(self) -> str:
        what = "daemon" if self.whole_daemon else "ClientApp"
        return f"{self.name} job {self.job}: {what} killed at {self.moment} + {self.delay:.2f} s ({self.landed})"


@dataclass
class Job:
    index: int
    job_id: str  # fedtune's job id: the ledger's key for the job (Flower's run id is not)
    completed: bool
    aggregated: set[tuple[str, int]]  # (institution, round) updates in the finished job's metrics.json
    privacy: dict = field(default_factory=dict)
    seconds: float = 0.0


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = _parents()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        children = [child for child, of in parents.items() if of == parent]
        found += children
        todo += children
    return found


def _cmdline(pid: int) -> bytes:
    with suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def _running(pid: int) -> bool:
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    return False


def clientapps(node: Node) -> list[int]:
    """The node's ClientApp processes, found as an operator would: by name, under the daemon."""
    return [pid for pid in descendants(node.process.pid) if b"flwr-clientapp" in _cmdline(pid)]


def kill_daemon(node: Node) -> int:
    """SIGKILL the daemon and everything under it at once, as a power cut would: freeze the tree
    first so that nothing forks or is re-parented away while it is collected."""
    frozen: list[int] = []
    while fresh := [pid for pid in [node.process.pid, *descendants(node.process.pid)] if pid not in frozen]:
        for pid in fresh:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen += fresh
    for pid in frozen:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.process.wait(30)
    return len(frozen)


def kill_when(node: Node, kill: Kill, progress: Follower, before: set[int]) -> Kill:
    """Wait for the node's ClientApp of this job and kill it (or the whole daemon) at `kill`'s moment."""
    deadline = time.monotonic() + 120
    while not [pid for pid in clientapps(node) if pid not in before]:
        assert time.monotonic() < deadline, f"seed {SEED}: {node.name} started no ClientApp:\n{tail(node.log)}"
        time.sleep(0.02)
    if kill.moment != "startup":
        wanted = (lambda event: True) if kill.moment == "training" else (lambda event: event["step"] == event["steps"])
        while not any(wanted(event) for event in progress.new_events()):
            assert time.monotonic() < deadline, f"seed {SEED}: {node.name} never trained:\n{tail(node.log)}"
            time.sleep(0.005)
    time.sleep(kill.delay)
    # Whichever ClientApp of this job runs now (with SecAgg+ a round starts several, one after another).
    targets = [pid for pid in clientapps(node) if pid not in before and _running(pid)]
    if kill.whole_daemon:
        kill.landed = f"{kill_daemon(node)} processes, {len(targets)} of them ClientApps"
        kill.then()
    elif not targets:
        kill.landed = "missed: no ClientApp running"
    else:
        for pid in targets:
            os.kill(pid, signal.SIGKILL)
        kill.landed = "hit"
    return kill


def draw_kill(rng: random.Random, name: str, job: int, moment: str, then: Callable[[], None] | None = None) -> Kill:
    return Kill(name, job, moment, rng.uniform(*MOMENTS[moment]), then is not None, then)


def run_job(index: int, coordinator, nodes: dict[str, Node], kills: list[Kill], slice_files, labels,
            folder: Path) -> Job:
    """Submit a one-round job, fire `kills` at it, and return once it ended.

    A job with kills runs without SecAgg+, so that every ClientApp is the one that trains (SecAgg+
    adds three exchanges whose processes never touch the ledger) and an update sent before its
    kill is still aggregated; a job without kills runs as configured by default.
    """
    changes = {"secure_aggregation": {"enabled": False}} if kills else {}
    job_file = write_job(folder / f"job{index}.toml", slice_files[1], labels,
                         federation={"rounds": 1, "round_timeout": KILLED_ROUND_TIMEOUT if kills else ROUND_TIMEOUT},
                         # Each job asks for one epsilon more than the last, within the nodes' budgets.
                         privacy={"target_epsilon": float(index)},
                         training={"local_epochs": LOCAL_EPOCHS}, **changes)
    out = folder / f"run{index}"
    followers = {}
    for name, node in nodes.items():
        followers[name] = Follower(node.state / "progress.jsonl")
        list(followers[name].new_events())  # only this job's steps count
    before = {name: set(clientapps(node)) for name, node in nodes.items()}
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1 + len(kills)) as pool:
        submitted = pool.submit(coordinator.run, "submit", job_file, "--out", out, timeout=SUBMIT_TIMEOUT)
        killers = [pool.submit(kill_when, nodes[k.name], k, followers[k.name], before[k.name]) for k in kills]
        result = submitted.result()
        for killer in killers:
            killer.result()
    (folder / f"submit{index}.log").write_text(result.stdout + result.stderr)
    found = re.search(r"submitted run (\d+)", result.stdout)
    assert found, f"seed {SEED}: job {index} was not submitted:\n{result.stdout[-2000:]}\n{result.stderr}"
    job_id = json.loads((coordinator.state / "runs.json").read_text())[found.group(1)]["job_id"]
    job = Job(index, job_id, False, set(), seconds=time.monotonic() - started)
    if result.returncode == 0 and (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        job.completed = True
        job.aggregated = {(name, r["round"]) for r in metrics["rounds"] for name in r["epsilon"]}
        job.privacy = json.loads((out / "privacy.json").read_text())
    return job


def current_supernode(node: Node) -> str:
    """The daemon's log since it last started a SuperNode: what a watchdog restart left behind
    (a message it had pulled and could not answer) is not this SuperNode's to answer."""
    return node.log.read_text(errors="replace").rpartition(STARTED)[2]


def wait_settled(node: Node, timeout: float = SETTLE) -> None:
    """Until the node runs no ClientApp and its SuperNode has answered every message it pulled
    (sent, or dropped because the run had ended): only then does its ledger hold its final word."""
    deadline = time.monotonic() + timeout
    while True:
        text = current_supernode(node)
        answered = sum(text.count(s) for s in ("Sent successfully", "Ignoring reply message", "Failed to send"))
        if answered >= text.count("Receiving:") and not clientapps(node):
            return
        assert time.monotonic() < deadline, f"seed {SEED}: {node.name} still busy after {timeout:.0f} s:\n{tail(node.log)}"
        time.sleep(1)


def wait_online(coordinator, node: Node, timeout: float = SETTLE) -> None:
    """Until the node's own SuperNode is connected: the coordinator alone would also say "online"
    for a killed predecessor during its last heartbeat interval."""
    deadline = time.monotonic() + timeout
    while "SuperNode ID:" not in current_supernode(node) or coordinator.institutions().get(node.name) != "online":
        assert node.process.poll() is None, f"seed {SEED}: {node.name}'s daemon exited:\n{tail(node.log)}"
        assert time.monotonic() < deadline, f"seed {SEED}: {node.name} not online after {timeout:.0f} s:\n{tail(node.log)}"
        time.sleep(2)


def ledger_rows(node: Node) -> list[tuple]:
    """(job, round, status, noise multiplier, sample rate, steps) per entry, after an integrity check.

    No file yet is no entry: a ClientApp killed before its first ledger write leaves none."""
    if not node.ledger.exists():
        return []
    with closing(sqlite3.connect(node.ledger, timeout=30)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"seed {SEED}: {node.ledger} is corrupt"
        return db.execute(
            "SELECT job, round, status, noise_multiplier, sample_rate, steps FROM releases ORDER BY id"
        ).fetchall()


def budget(node: Node, env: dict) -> dict:
    """The node's row of `fedtune-client budget --json` (one data set per node); spent 0 before any ledger."""
    result = cli("client", "budget", "--state-dir", node.state, "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    if not node.ledger.exists():
        assert rows == [], result.stdout
        return {"spent_epsilon": 0.0}
    [row] = rows
    return row


def check_ledger(node: Node, jobs: list[Job], kills: list[Kill], env: dict) -> dict:
    """Every invariant of one node's ledger against what the coordinator aggregated; its budget row."""
    rows = ledger_rows(node)
    hits = [k for k in kills if k.name == node.name and not k.landed.startswith("missed")]
    context = (f"seed {SEED}\nkills: " + "; ".join(map(str, kills)) + f"\n{node.name} ledger: {rows}\n"
               + "\n".join(f"job {j.index} ({j.job_id}): completed {j.completed}, aggregated {sorted(j.aggregated)}"
                           for j in jobs))
    assert {row[2] for row in rows} <= {"pending", "released"}, context
    released = [(row[0], row[1]) for row in rows if row[2] == "released"]
    assert len(released) == len(set(released)), f"a round released twice\n{context}"
    for job in jobs:
        if not job.completed:
            continue  # nothing of it was aggregated; what left the node cannot be told from here
        got = {(job.job_id, rnd) for name, rnd in job.aggregated if name == node.name}
        assert got <= set(released), f"lost: aggregated but not released: {sorted(got - set(released))}\n{context}"
        unreceived = {(run, rnd) for run, rnd in released if run == job.job_id} - got
        killed_here = [k for k in hits if k.job == job.index]
        assert len(unreceived) <= len(killed_here), (
            f"released but never aggregated, more than the {len(killed_here)} kill(s) in flight: {sorted(unreceived)}\n{context}"
        )
    row = budget(node, env)
    if not rows:
        return row
    history = [(noise, rate, steps) for _, _, status, noise, rate, steps in rows if status == "released"]
    assert row["spent_epsilon"] == pytest.approx(epsilon(history, row["delta"], row["accountant"]), rel=1e-9), context
    assert row["steps"] == sum(steps for _, _, steps in history), f"pending entries counted\n{context}"
    assert row["spent_epsilon"] <= row["budget_epsilon"] + 1e-9, context
    return row


def outcome(kill: Kill, jobs: list[Job], nodes: dict[str, Node]) -> str:
    """What the kill left for its job: no entry, pending, or released (and whether aggregated)."""
    job = jobs[kill.job - 1]
    statuses = [row[2] for row in ledger_rows(nodes[kill.name]) if row[0] == job.job_id]
    aggregated = "aggregated" if (kill.name, 1) in job.aggregated else "not aggregated"
    return f"{kill} -> {'/'.join(statuses) or 'no entry'}, {aggregated}"


def current_nodes(federation) -> dict[str, Node]:
    """Each institution's daemon, the latest one started where one was restarted."""
    nodes = {}
    for process in federation.started:
        name = process.argv[process.argv.index("--name") + 1]
        nodes[name] = Node(name, process, federation.folder / f"{name}.log", federation.folder / name / "state")
    return nodes


def test_random_kills_of_the_daemon_never_lose_nor_invent_a_release(coordinator, federation, data_files,
                                                                       banking_slice, slice_labels, env, tmp_path):
    rng = random.Random(SEED)
    nodes = current_nodes(federation)
    moments = [*rng.sample(list(MOMENTS), 3), rng.choice(list(MOMENTS))]  # each moment at least once
    kills: list[Kill] = []
    jobs: list[Job] = []

    def job(index: int, planned: list[Kill]) -> Job:
        kills.extend(planned)
        jobs.append(run_job(index, coordinator, nodes, planned, banking_slice, slice_labels, tmp_path))
        return jobs[-1]

    def settle_and_check() -> dict[str, dict]:
        rows = {}
        for node in nodes.values():
            wait_settled(node)
            wait_online(coordinator, node)
            rows[node.name] = check_ledger(node, jobs, kills, env)
        return rows

    # Job 1: each institution's ClientApp killed at its own random moment.
    job(1, [draw_kill(rng, "alpha", 1, moments[0]), draw_kill(rng, "beta", 1, moments[1])])
    spent_before = settle_and_check()["alpha"]["spent_epsilon"]

    # Job 2: alpha's whole daemon killed and restarted at once on its state folder, as an operator or a
    # service manager would; beta's ClientApp killed too.
    def restart_alpha() -> None:
        killed = nodes["alpha"]
        killed.log.rename(killed.log.with_name("alpha-killed.log"))
        process, log, _ = start_institution(federation, coordinator, "alpha", data_files["alpha"],
                                            key=federation.folder / "alpha" / "node.key")
        nodes["alpha"] = Node("alpha", process, log, killed.state)

    job(2, [draw_kill(rng, "alpha", 2, moments[3], then=restart_alpha), draw_kill(rng, "beta", 2, moments[2])])
    after_restart = check_ledger(nodes["alpha"], jobs, kills, env)
    assert after_restart["spent_epsilon"] >= spent_before, f"seed {SEED}: the restart lost spent budget"
    settle_and_check()

    # Job 3, no kill, default settings: both train, and the restarted alpha accounts over its whole history.
    last = job(3, [])
    assert last.completed and {name for name, _ in last.aggregated} == {"alpha", "beta"}, (
        f"seed {SEED}: the job after the kills did not finish with both institutions:\n"
        f"{(tmp_path / 'submit3.log').read_text()[-3000:]}"
    )
    for name, row in settle_and_check().items():
        [reported] = [inst for inst in last.privacy["institutions"] if inst["name"] == name]
        assert reported["dataset_epsilon"] == pytest.approx(row["spent_epsilon"], rel=1e-9), (
            f"seed {SEED}: {name} reported data set epsilon {reported['dataset_epsilon']}, its ledger says "
            f"{row['spent_epsilon']}"
        )
    restarts = {name: sum(log.read_text().count(RESTARTED_STUCK) for log in federation.folder.glob(f"{name}*.log"))
                for name in nodes}
    print(f"\nseed {SEED}; jobs " + ", ".join(f"{j.seconds:.0f} s" for j in jobs) + f"; watchdog restarts {restarts}\n"
          + "\n".join(outcome(kill, jobs, nodes) for kill in kills))
