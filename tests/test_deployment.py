"""The deployable product end to end: a TLS coordinator and two institutions as real processes.

Everything runs on 127.0.0.1 with ports chosen at run time. Certificates come from
`fedtune-server`, node keys from `fedtune-client`; every process is stopped by its fixture, on
pass or fail. A Flower deployment round costs 12-20 s here, so one 2-round job serves the
positive checks and the negative ones fail before any training.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sqlite3
import ssl
import time
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
import tomli_w
from opacus.accountants.analysis import rdp as opacus_rdp

from client.privacy.ledger import LEDGER_FILE, RDP_MEMO_FILE
from common.processes import FlowerProcess, flower_env, flower_executable
from server import pki
from server.fleet_events import FLEET_EVENTS_FILE, Fault, FleetEvent, key_sha256
from server.fleet_events import read as read_fleet_events

from deployment_support import (
    STOP_GRACE,
    TEST_BUDGET,
    Coordinator,
    cli,
    free_port,
    start_coordinator,
    start_institution,
    tail,
    wait_for_exit,
    write_job,
)

pytestmark = pytest.mark.timeout(420)


def test_job_finishes_over_tls_with_every_institution_in_every_round(coordinator, federation, finished_job):
    out, result, seconds = finished_job
    run_id = result.stdout.split("submitted run ")[1].split(":")[0]
    [run] = [run for run in coordinator.runs() if str(run["run-id"]) == run_id]
    assert run["status"] == "finished:completed"
    assert "[ROUND 2]" in result.stdout and "Secure aggregation completed" in result.stdout  # followed the log
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(inst["name"] for inst in metrics["institutions"]) == ["alpha", "beta"]
    assert all(inst["rounds"] == 2 for inst in metrics["institutions"])
    for name in ("alpha", "beta"):  # each institution's privacy ledger stays in its own state folder
        state = federation.folder / name / "state"
        assert (state / LEDGER_FILE).is_file()
        # Beside it, Opacus' own RDP values of the ledger's mechanisms, for the next round's process.
        with closing(sqlite3.connect(state / LEDGER_FILE)) as db:
            mechanisms = set(db.execute("SELECT sample_rate, noise_multiplier FROM releases"))
        memo = json.loads((state / RDP_MEMO_FILE).read_text())["entries"]
        assert mechanisms and {(rate, noise) for rate, noise, _, _ in memo} == mechanisms
        opacus_own = getattr(opacus_rdp._compute_rdp, "__wrapped__", opacus_rdp._compute_rdp)
        assert all(value == opacus_own(rate, noise, order) for rate, noise, order, value in memo[::25])
    rounds = metrics["rounds"]
    print(f"\njob: {seconds:.0f} s end to end; ServerApp {metrics['wall_seconds']:.0f} s; "
          f"round 1 {rounds[1]['seconds'] - rounds[0]['seconds']:.1f} s, "
          f"round 2 {rounds[2]['seconds'] - rounds[1]['seconds']:.1f} s over TLS with 2 institutions")


def test_global_model_changed(finished_job, slice_labels):
    import torch
    from safetensors.torch import load_file

    from common.config import ModelConfig
    from common.models.encoder import build_model

    out, _, _ = finished_job
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][-1]["loss"] < metrics["rounds"][0]["loss"]
    config = ModelConfig.model_validate(metrics["config"]["model"])
    initial = build_model(config, slice_labels, torch.device("cpu"), seed=metrics["config"]["federation"]["seed"])
    final = load_file(out / "model" / "head.safetensors")
    assert not torch.allclose(initial.head.weight.detach(), final["weight"])


def test_submit_prints_each_log_line_once_and_the_console_reads_the_run(coordinator, finished_job):
    """Opacus' root log handler used to print every ServerApp line twice; the console reads what
    the coordinator wrote (runs.json, the run folder's live.json and metrics.json, `flwr ls`)."""
    import re

    from server.console import CoordinatorJobs

    out, result, _ = finished_job
    assert result.stdout.count("[ROUND 1]") == 1, result.stdout[-3000:]
    assert not re.search(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(INFO|DEBUG):", result.stdout, re.M)
    run_id = result.stdout.split("submitted run ")[1].split(":")[0]
    live = json.loads((out / "live.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["accuracy"] for r in live["rounds"]] == [r["accuracy"] for r in metrics["rounds"]]
    jobs = CoordinatorJobs(coordinator.state)
    jobs.poll_flower()
    snapshot = jobs.snapshot()
    [job] = [job for job in snapshot["jobs"] if job["id"] == run_id]
    assert job["status"] == "finished" and job["round"] == 2 and job["final"]
    assert {i["name"]: i["dataset_epsilon"] for i in job["institutions"]} == {
        i["name"]: i["dataset_epsilon"] for i in metrics["institutions"]}
    assert {(n["name"], n["status"]) for n in snapshot["nodes"]} >= {("alpha", "online"), ("beta", "online")}


def test_status_and_export(coordinator, finished_job, tmp_path):
    out, result, _ = finished_job
    run_id = result.stdout.split("submitted run ")[1].split(":")[0]
    status = coordinator.run("status", run_id)
    assert status.returncode == 0 and "finished:completed" in status.stdout and str(out) in status.stdout
    exported = coordinator.run("export", run_id, "--to", tmp_path / "copy")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "copy" / "metrics.json").read_bytes() == (out / "metrics.json").read_bytes()
    assert (tmp_path / "copy" / "model" / "head.safetensors").is_file()


def test_institution_never_admitted_is_refused(coordinator, federation, data_files, processes):
    process, log, _ = start_institution(processes, coordinator, "gamma", data_files["alpha"])
    assert wait_for_exit(process, log, 90) == 1
    assert "refused this institution's key: it was never admitted, or it was revoked" in log.read_text()
    assert "gamma" not in coordinator.institutions()
    # the coordinator's side says so in one line, with the key's fingerprint instead of its PEM
    fingerprint = key_sha256((processes.folder / "gamma" / "node.pub").read_bytes())
    refused = wait_for_fleet_event(coordinator, lambda e: e.fault == Fault.REFUSED_KEY and e.key_sha256 == fingerprint)
    assert refused.institution is None
    wait_for_text(coordinator.log, f"fedtune: refused an unknown node key (sha256 {fingerprint[:16]}): never admitted", 1, 10)


def wait_for_fleet_event(coordinator, matches, timeout: float = 30) -> FleetEvent:
    """The first Fleet fault the coordinator recorded (server/fleet_events.py) that `matches`."""
    deadline = time.monotonic() + timeout
    while not (found := [e for e in read_fleet_events(coordinator.state / FLEET_EVENTS_FILE) if matches(e)]):
        assert time.monotonic() < deadline, f"no such fleet event:\n{tail(coordinator.log)}"
        time.sleep(0.5)
    return found[0]


def wait_for_text(log: Path, text: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not seen {count} times:\n{tail(log)}"
        time.sleep(0.5)


def test_institution_node_survives_a_crash_and_is_cut_off_when_revoked(coordinator, federation, data_files,
                                                                         processes):
    folder = processes.folder / "delta"
    assert cli("client", "keygen", "--out", folder, env=coordinator.env).returncode == 0
    assert coordinator.run("admit", folder / "node.pub", "--name", "delta").returncode == 0
    process, log, _ = start_institution(processes, coordinator, "delta", data_files["beta"], key=folder / "node.key")
    coordinator.wait_for("delta", "online")
    wait_for_text(log, "SuperNode ID:", 1, 30)
    supernode_pid = int(log.read_text().split("SuperNode started (pid ")[1].split(")")[0])
    os.kill(supernode_pid, signal.SIGKILL)
    # Flower refuses the same key while it still counts the killed node online (2 heartbeats, 60 s).
    wait_for_text(log, "SuperNode ID:", 2, 150)
    assert "the SuperNode exited (code -9); restarting" in log.read_text()
    assert "fedtune-client: error" not in log.read_text()
    coordinator.wait_for("delta", "online")

    revoked = coordinator.run("revoke", "delta")
    assert revoked.returncode == 0, revoked.stderr
    assert wait_for_exit(process, log, 90) == 1
    assert "refused this institution's key" in log.read_text()
    assert coordinator.institutions()["delta"] == "unregistered"
    # the coordinator named the institution whose key it refused, both times
    restarted = wait_for_fleet_event(coordinator, lambda e: e.institution == "delta" and not e.revoked)
    assert restarted.sentence().startswith("refused the node key of delta (admitted, not revoked:")
    refused = wait_for_fleet_event(coordinator, lambda e: e.fault == Fault.REFUSED_KEY and e.institution == "delta"
                                   and e.revoked is not None)
    assert refused.sentence() == f"refused the node key of delta: revoked {refused.revoked}"
    again = coordinator.run("admit", folder / "node.pub", "--name", "delta-again")
    assert again.returncode == 1 and "Public key already in use" in again.stderr


def test_certificate_from_another_ca_is_refused(coordinator, federation, data_files, processes, tmp_path):
    other = pki.init_ca(tmp_path / "other-ca")
    process, log, _ = start_institution(processes, coordinator, "epsilon", data_files["alpha"], ca=other.cert)
    assert wait_for_exit(process, log, 60) == 1
    assert "certificate rejected: unable to get local issuer certificate" in log.read_text()
    assert "Starting Flower SuperNode" not in log.read_text()


def test_fleet_port_speaks_only_tls_with_http2(coordinator, federation, data_files, processes):
    host, port = coordinator.fleet.split(":")
    context = ssl.create_default_context(cafile=str(coordinator.certs / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() == "h2"
    # A plaintext HTTP/2 client: the port hangs up without a single HTTP/2 frame.
    with socket.create_connection((host, int(port)), timeout=10) as plain:
        plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        assert plain.recv(100) == b""
    channel = grpc.insecure_channel(coordinator.fleet)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=5)
    channel.close()
    # Each plaintext attempt is a fault on the coordinator's side too.
    wait_for_fleet_event(coordinator, lambda e: e.fault == Fault.PLAINTEXT)
    wait_for_text(coordinator.log, "fedtune: refused a plaintext connection to the Fleet port", 1, 10)
    assert "Handshake failed" not in coordinator.log.read_text()  # gRPC's own INFO lines are not passed on
    from server.console import CoordinatorJobs

    shown = [fault["sentence"] for fault in CoordinatorJobs(coordinator.state).snapshot()["faults"]]
    assert "refused a plaintext connection to the Fleet port (TLS is required)" in shown  # and the console shows it
    # And fedtune's own plaintext client says why it cannot connect.
    process, log = processes.start("plain", "client", "start", "--superlink", coordinator.fleet, "--insecure",
                                   "--data", data_files["alpha"], "--name", "plain",
                                   "--state-dir", processes.folder / "plain", "--port", free_port(), *TEST_BUDGET)
    assert wait_for_exit(process, log, 60) == 1
    text = log.read_text()
    assert "WARNING: --insecure" in text and "requires TLS: drop --insecure" in text


@pytest.mark.parametrize("problem", ["expired", "wrong-host"])
def test_expired_or_wrong_host_certificate_is_refused_by_the_institution(problem, certs, env, data_files, processes,
                                                                         tmp_path):
    """A coordinator with a bad certificate (started by Flower directly: fedtune-server would refuse an expired one)."""
    issued = tmp_path / "issued"
    if problem == "expired":
        pki.issue_server_cert(certs, issued, ["localhost"], ["127.0.0.1"], days=1,
                              not_before=datetime.now(timezone.utc) - timedelta(days=3))
        expected = "certificate rejected: certificate has expired"
    else:
        pki.issue_server_cert(certs, issued, ["coordinator.elsewhere.example"], [], days=30)
        expected = "certificate rejected: IP address mismatch, certificate is not valid for '127.0.0.1'"
    port, fleet_port = free_port(), free_port()
    command = [flower_executable("flower-superlink"), "--ssl-ca-certfile", certs / "ca.pem",
               "--ssl-certfile", issued / "server.pem", "--ssl-keyfile", issued / "server.key",
               "--enable-supernode-auth", "--host", "127.0.0.1", "--port", port,
               "--fleet-api-address", f"127.0.0.1:{fleet_port}", "--database", tmp_path / "link.db"]
    with (tmp_path / "superlink.log").open("w") as handle:
        superlink = FlowerProcess(list(map(str, command)), flower_env(tmp_path / "flwr-home"), stdout=handle)
    try:
        superlink.wait_for_port("127.0.0.1", fleet_port, timeout=60)
        coordinator = Coordinator(tmp_path, certs, f"127.0.0.1:{fleet_port}", tmp_path / "superlink.log", env)
        process, log, _ = start_institution(processes, coordinator, "zeta", data_files["alpha"])
        assert wait_for_exit(process, log, 60) == 1
        assert expected in log.read_text()
    finally:
        superlink.stop(STOP_GRACE)


def test_coordinator_refuses_an_expired_certificate_and_plaintext_without_insecure(certs, env, data_files, tmp_path):
    expired = tmp_path / "expired"
    pki.issue_server_cert(certs, expired, ["localhost"], ["127.0.0.1"], days=1,
                          not_before=datetime.now(timezone.utc) - timedelta(days=3))
    result = cli("server", "start", "--state-dir", tmp_path / "state", "--certs", expired, env=env)
    assert result.returncode == 2 and "expired on" in result.stderr and result.stderr.count("\n") == 1
    result = cli("server", "start", "--state-dir", tmp_path / "state", "--certs", tmp_path / "none", env=env)
    assert result.returncode == 2 and "--insecure" in result.stderr
    result = cli("client", "start", "--superlink", "127.0.0.1:1", "--data", data_files["alpha"], "--name", "x", env=env)
    assert result.returncode == 2 and "--insecure is for local trials only" in result.stderr


def test_insecure_coordinator_warns_on_start(env, processes, tmp_path):
    coordinator = start_coordinator(processes, tmp_path / "state", tmp_path / "no-certs", env, "--insecure")
    assert "WARNING: --insecure: TLS is off" in coordinator.log.read_text()
    assert coordinator.institutions() == {}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"labels": None}}, "data.labels: a deployed job must list its labels"),
        ({"training": {"batchsize": 48}}, "training.batchsize: Extra inputs are not permitted"),
        ({"data": {"test_path": "/nonexistent/test.csv"}}, "/nonexistent/test.csv: no such file"),
        ({"data": {"labels": ["only_one"]}}, "is not one of the job's 1 labels"),
        ({"federation": {"institutions": 5}}, "the job needs 5 institutions (federation.institutions) but"),
    ],
    ids=["no-labels", "unknown-key", "missing-test-file", "label-outside-set", "too-many-institutions"],
)
def test_invalid_job_fails_before_any_institution_trains(change, expected, coordinator, federation, banking_slice,
                                                         slice_labels, tmp_path):
    runs_before = len(coordinator.runs())
    job = {"data": {"test_path": str(banking_slice[1]), "labels": slice_labels},
           "federation": {"institutions": 2, "rounds": 2}, "training": {"batch_size": 48}}
    for section, values in change.items():
        job.setdefault(section, {}).update(values)
        job[section] = {key: value for key, value in job[section].items() if value is not None}
    (tmp_path / "job.toml").write_text(tomli_w.dumps(job))
    result = coordinator.run("submit", tmp_path / "job.toml", "--out", tmp_path / "run")
    assert result.returncode in (1, 2)
    assert expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert len(coordinator.runs()) == runs_before
    assert not (tmp_path / "run").exists()


def test_institution_checks_its_file_against_the_job_without_a_coordinator(data_files, banking_slice, slice_labels,
                                                                           tmp_path, env):
    job = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels)
    ok = cli("client", "check", data_files["alpha"], "--job", job, env=env)
    assert ok.returncode == 0 and "nothing was sent" in ok.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,x\n")
    result = cli("client", "check", bad, "--job", job, env=env)
    assert result.returncode == 2
    assert f"{bad}: row 2: no column 'category'" in result.stderr and result.stderr.count("\n") == 1
    foreign = tmp_path / "foreign.csv"
    foreign.write_text(f"text,category\nhi,{slice_labels[0]}\nhello,not_a_job_label\n")
    result = cli("client", "check", foreign, "--job", job, env=env)
    assert result.returncode == 2 and f"{foreign}: record 2: label 'not_a_job_label'" in result.stderr


def test_a_probing_job_leaves_no_record_value_or_path_on_the_coordinator(coordinator, federation, data_files,
                                                                          banking_slice, slice_labels, tmp_path):
    """Regression: a job naming one label once left the first value of the institution's label
    column, its file's path and its column list in the SuperLink's database, via the error text."""
    probed = slice_labels[0]
    with banking_slice[1].open(encoding="utf-8", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] == probed]
    test_file = tmp_path / "test.csv"
    with test_file.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    job = write_job(tmp_path / "job.toml", test_file, [probed], federation={"rounds": 1})
    result = coordinator.run("submit", job, "--out", tmp_path / "run", timeout=300)
    assert result.returncode == 1 and "refused: its data does not match the job's columns or labels" in result.stdout
    secrets = {str(path) for path in data_files.values()} | {path.name for path in data_files.values()}
    for path in data_files.values():
        with path.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                secrets |= {row["text"]}  # labels: every earlier job of this module named them all
    seen = result.stdout + result.stderr + json.dumps(coordinator.runs())
    seen += "".join(path.read_bytes().decode("latin-1") for path in coordinator.state.rglob("*") if path.is_file())
    leaked = sorted(secret for secret in secrets if len(secret) >= 8 and secret in seen)
    assert not leaked, leaked[:5]
