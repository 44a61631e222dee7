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
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
import tomli_w

from common.config import REPO_ROOT
from common.processes import FlowerProcess, flower_env, flower_executable
from server import pki

pytestmark = pytest.mark.timeout(420)

STOP_GRACE = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(tool: str, *args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `fedtune-server` / `fedtune-client` as an operator would (module form: no install needed)."""
    module = {"server": "server.cli", "client": "client.cli"}[tool]
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


class Processes:
    """Long-running CLIs started by one test or fixture; all stopped at its end."""

    def __init__(self, folder: Path, env: dict):
        self.folder, self.env, self.started = folder, env, []

    def start(self, name: str, tool: str, *args: str) -> tuple[FlowerProcess, Path]:
        log = self.folder / f"{name}.log"
        module = {"server": "server.cli", "client": "client.cli"}[tool]
        with log.open("w") as handle:
            process = FlowerProcess([sys.executable, "-m", module, *map(str, args)], self.env, cwd=REPO_ROOT,
                                    stdout=handle)
        self.started.append(process)
        return process, log

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop(STOP_GRACE)


@pytest.fixture
def processes(tmp_path, env):
    procs = Processes(tmp_path, env)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Our own FLWR_HOME for anything that would otherwise use ~/.flwr; Flower's phone-home off."""
    home = tmp_path_factory.mktemp("flwr-home-of-tests")
    return flower_env(home, {"FEDTUNE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def certs(tmp_path_factory, env):
    folder = tmp_path_factory.mktemp("coordinator-certs")
    assert cli("server", "ca", "init", "--dir", folder, env=env).returncode == 0
    assert cli("server", "cert", "issue", "--dir", folder, env=env).returncode == 0
    return folder


@dataclass
class Coordinator:
    state: Path
    certs: Path
    fleet: str
    log: Path
    env: dict

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return cli("server", *args, "--state-dir", self.state, env=self.env, timeout=timeout)

    def institutions(self) -> dict[str, str]:
        result = self.run("institutions")
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return {row[0]: row[2] for row in rows if len(row) >= 3}

    def runs(self) -> list[dict]:
        """Flower's own record of the runs (`flwr ls --format json`), not fedtune's."""
        result = subprocess.run([flower_executable("flwr"), "ls", "fedtune", "--format", "json"], capture_output=True,
                                text=True, env=flower_env(self.state / "flwr-home"), timeout=60)
        answer = json.loads(result.stdout)
        assert answer["success"], answer
        return answer["runs"]

    def wait_for(self, name: str, status: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.institutions().get(name)) != status:
            assert time.monotonic() < deadline, f"{name} is {current}, not {status}\n{tail(self.log)}"
            time.sleep(2)


def start_coordinator(procs: Processes, state: Path, certs: Path, env: dict, *extra: str) -> Coordinator:
    port, fleet = free_port(), f"127.0.0.1:{free_port()}"
    process, log = procs.start("coordinator", "server", "start", "--state-dir", state, "--certs", certs,
                               "--port", port, "--fleet-address", fleet, *extra)
    deadline = time.monotonic() + 60
    while "fedtune-server: ready" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.3)
    return Coordinator(state, certs, fleet, log, env)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory, certs, env):
    folder = tmp_path_factory.mktemp("coordinator")
    procs = Processes(folder, env)
    try:
        yield start_coordinator(procs, folder / "state", certs, env)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def data_files(banking_slice, tmp_path_factory) -> dict[str, Path]:
    """The slice's training records split between two institutions, one file each."""
    folder = tmp_path_factory.mktemp("institutions")
    with banking_slice[0].open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = {}
    for index, name in enumerate(("alpha", "beta")):
        files[name] = folder / f"{name}.csv"
        with files[name].open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(rows[index::2])
    return files


def start_institution(procs: Processes, coordinator: Coordinator, name: str, data: Path,
                      ca: Path | None = None, key: Path | None = None):
    folder = procs.folder / name
    if key is None:
        made = cli("client", "keygen", "--out", folder, env=coordinator.env)
        assert made.returncode == 0, made.stderr
        key = folder / "node.key"
    process, log = procs.start(
        name, "client", "start", "--superlink", coordinator.fleet,
        "--root-certificates", ca or coordinator.certs / "ca.pem", "--private-key", key,
        "--data", data, "--name", name, "--device", "cpu", "--state-dir", folder / "state", "--port", free_port(),
    )
    return process, log, folder


def wait_for_exit(process: FlowerProcess, log: Path, timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the institution is still running after {timeout:.0f} s:\n{tail(log)}")


@pytest.fixture(scope="module")
def federation(coordinator, data_files, tmp_path_factory, env):
    """Two admitted institutions, online."""
    procs = Processes(tmp_path_factory.mktemp("federation"), env)
    try:
        for name, data in data_files.items():
            assert cli("client", "keygen", "--out", procs.folder / name, env=env).returncode == 0
            admitted = coordinator.run("admit", procs.folder / name / "node.pub", "--name", name)
            assert admitted.returncode == 0, admitted.stderr
            start_institution(procs, coordinator, name, data, key=procs.folder / name / "node.key")
        for name in data_files:
            coordinator.wait_for(name, "online")
        yield procs
    finally:
        procs.stop_all()


def write_job(path: Path, test_file: Path, labels: list[str], **sections) -> Path:
    job = {
        "data": {"test_path": str(test_file), "labels": labels},
        "federation": {"institutions": 2, "rounds": 2},
        "training": {"batch_size": 48, "threads": 1},
    }
    for section, values in sections.items():
        job.setdefault(section, {}).update(values)
    path.write_text(tomli_w.dumps(job))
    return path


@pytest.fixture(scope="module")
def finished_job(coordinator, federation, banking_slice, slice_labels, tmp_path_factory):
    folder = tmp_path_factory.mktemp("job")
    job = write_job(folder / "job.toml", banking_slice[1], slice_labels)
    started = time.monotonic()
    result = coordinator.run("submit", job, "--out", folder / "run", timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr}\n{tail(federation.folder / 'alpha.log')}"
    return folder / "run", result, time.monotonic() - started


def test_job_finishes_over_tls_with_every_institution_in_every_round(coordinator, federation, finished_job):
    out, result, seconds = finished_job
    run_id = result.stdout.split("submitted run ")[1].split(":")[0]
    [run] = [run for run in coordinator.runs() if str(run["run-id"]) == run_id]
    assert run["status"] == "finished:completed"
    assert "[ROUND 2/2]" in result.stdout  # the coordinator's log was followed
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(inst["name"] for inst in metrics["institutions"]) == ["alpha", "beta"]
    assert all(inst["rounds"] == 2 for inst in metrics["institutions"])
    for name in ("alpha", "beta"):  # each institution's privacy ledger stays in its own state folder
        assert (federation.folder / name / "state" / "ledger.sqlite").is_file()
    rounds = metrics["rounds"]
    print(f"\njob: {seconds:.0f} s end to end; ServerApp {metrics['wall_seconds']:.0f} s; "
          f"round 1 {rounds[1]['seconds'] - rounds[0]['seconds']:.1f} s, "
          f"round 2 {rounds[2]['seconds'] - rounds[1]['seconds']:.1f} s over TLS with 2 institutions")


def test_global_model_changed(finished_job, slice_labels):
    import torch
    from safetensors.torch import load_file

    from common.config import ModelConfig
    from common.model import build_model

    out, _, _ = finished_job
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"][-1]["loss"] < metrics["rounds"][0]["loss"]
    config = ModelConfig.model_validate(metrics["config"]["model"])
    initial = build_model(config, slice_labels, torch.device("cpu"), seed=metrics["config"]["federation"]["seed"])
    final = load_file(out / "model" / "head.safetensors")
    assert not torch.allclose(initial.head.weight.detach(), final["weight"])


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
    # And fedtune's own plaintext client says why it cannot connect.
    process, log = processes.start("plain", "client", "start", "--superlink", coordinator.fleet, "--insecure",
                                   "--data", data_files["alpha"], "--name", "plain",
                                   "--state-dir", processes.folder / "plain", "--port", free_port())
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
