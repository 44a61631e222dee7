"""The machine's other users and processes are attackers too: every local surface is closed to them.

Checked as they would try it, against real processes: the coordinator's Control API without the
operator's token, a task claim on either Runtime API without the SuperExec secret, `ps` while a
job runs (no secret or task token on any command line), the listening sockets of every process
of a deployment and of a Ray simulation (loopback only), the modes of everything fedtune and
Flower wrote (owner only), and the TLS versions the two ports accept. One 1-round job serves the
deployment checks; the refusals need no job.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import tomli_w
from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TaskType

from common.config import REPO_ROOT
from common.processes import SUPEREXEC_SECRET, flower_executable, is_loopback, private_dir, write_secret
from common.superexec import read_secret, runtime_client
from deployment_support import approve, cli, tail, write_job
from server import control, link_chores
from server.control import CONNECTION
from server.coordinator import CONTROL_TOKEN
from server.coordinator import Coordinator as CoordinatorState

pytestmark = pytest.mark.timeout(420)


# -- what an attacker on the machine sees ---------------------------------------------------------

def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@dataclass
class Seen:
    """Listening sockets and command lines of process trees, sampled while something runs."""

    listeners: set[tuple[str, str, int]] = field(default_factory=set)  # (program, ip, port)
    cmdlines: dict[int, list[str]] = field(default_factory=dict)

    def sample(self, pids: list[int]) -> None:
        for pid in pids:
            for process in tree(pid):
                try:
                    self.cmdlines.setdefault(process.pid, process.cmdline())
                    for conn in process.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.listeners.add((process.name(), conn.laddr.ip, conn.laddr.port))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue

    def programs(self, needle: str) -> list[list[str]]:
        return [argv for argv in self.cmdlines.values() if any(needle in part for part in argv)]


class Sampler(threading.Thread):
    def __init__(self, pids: list[int], every: float = 0.3):
        super().__init__(daemon=True)
        self.pids, self.every, self.seen, self.done = pids, every, Seen(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.seen.sample(self.pids)
            self.done.wait(self.every)

    def stop(self) -> Seen:
        self.done.set()
        self.join()
        self.seen.sample(self.pids)
        return self.seen


def open_to_others(root: Path) -> list[str]:
    """Every file or folder under `root` (itself included) with a group or other permission bit."""
    loose = []
    for folder, dirs, files in os.walk(root):
        for entry in [folder, *(os.path.join(folder, name) for name in [*dirs, *files])]:
            mode = os.lstat(entry).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                loose.append(f"{entry} {stat.filemode(mode)}")
    return sorted(set(loose))


def assert_loopback_only(seen: Seen) -> None:
    assert seen.listeners, "no listening socket seen at all"
    public = sorted(entry for entry in seen.listeners if not is_loopback(entry[1]))
    assert not public, f"listening beyond loopback: {public}"


# -- refusals before anything starts --------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "coordinator.example.org"])
def test_a_control_api_on_another_interface_is_refused_with_one_line(host, env, tmp_path):
    result = cli("server", "start", "--state-dir", tmp_path / "state", "--insecure", "--host", host, env=env)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"fedtune-server: error: --host {host}: the control API") and "SSH tunnel" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "state").exists()


def test_a_node_api_on_another_interface_is_refused_with_one_line(data_files, env, tmp_path):
    result = cli("client", "start", "--superlink", "127.0.0.1:1", "--insecure", "--data", data_files["alpha"],
                 "--name", "x", "--state-dir", tmp_path / "state", "--host", "0.0.0.0", env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fedtune-client: error: --host 0.0.0.0: the node's local app API listens on "
                                     "loopback only (127.0.0.1 or ::1); to reach it from another machine, use an "
                                     "SSH tunnel (docs/operators.md, 'Remote administration')")
    assert not (tmp_path / "state").exists()


def test_loopback_means_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.5", "fd00::2", "::ffff:10.0.0.5", "example.org"]))


def test_state_folders_are_tightened_and_secrets_are_fresh_owner_only_files(tmp_path):
    old = tmp_path / "state"
    (old / "sub").mkdir(parents=True)
    (old / "sub" / "ledger.sqlite").write_text("x")
    for path, mode in ((old, 0o755), (old / "sub", 0o775), (old / "sub" / "ledger.sqlite", 0o644)):
        path.chmod(mode)  # what an older fedtune, or another umask, left
    private_dir(old)
    assert open_to_others(old) == []
    first = read_secret(write_secret(old / SUPEREXEC_SECRET))
    second = read_secret(write_secret(old / SUPEREXEC_SECRET))
    assert len(first) == len(second) == 32 and first != second
    assert stat.S_IMODE((old / SUPEREXEC_SECRET).stat().st_mode) == 0o600
    (old / SUPEREXEC_SECRET).chmod(0o640)
    with pytest.raises(ValueError, match="readable by other users; it must be mode 0600"):
        read_secret(old / SUPEREXEC_SECRET)


# -- a running deployment, as another local user sees it -----------------------------------------

def supernode_port(federation, name: str) -> int:
    """The local app API port of institution `name`'s SuperNode, read from its command line."""
    for process in federation.started:
        for child in tree(process.pid):
            argv = child.cmdline()
            if any("flower-supernode" in part for part in argv) and str(federation.folder / name / "state") in " ".join(argv):
                return int(argv[argv.index("--port") + 1])
    raise AssertionError(f"no SuperNode of {name} running")


def control_address(coordinator) -> str:
    """Where the operator's `flwr` CLI dials the Control API (FLWR_HOME/config.toml)."""
    config = tomllib.loads((coordinator.state / "flwr-home" / "config.toml").read_text())
    return config["superlink"]["fedtune"]["address"]


def list_nodes(address: str, ca: Path, token: str | None) -> httpx.Response:
    headers = {"content-type": "application/protobuf", "accept": "application/protobuf"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(f"https://{address}/v1/control/list-nodes", content=ListNodesRequest().SerializeToString(),
                      headers=headers, verify=str(ca), timeout=30)


def test_the_control_api_answers_only_the_operators_token(coordinator, federation, tmp_path):
    address, ca = control_address(coordinator), coordinator.certs / "ca.pem"
    # Another local user holds the public ca.pem, and nothing else.
    assert list_nodes(address, ca, None).status_code == 401
    assert list_nodes(address, ca, "0" * 64).status_code == 401
    home = tmp_path / "attacker-flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": "fedtune", "fedtune": {"address": address, "root-certificates": str(ca)}}}))
    attempt = subprocess.run([flower_executable("flwr"), "supernode", "ls", "fedtune", "--format", "json"],
                             env=dict(coordinator.env, FLWR_HOME=str(home)), capture_output=True, text=True, timeout=60)
    assert '"success": false' in attempt.stdout and "uthenticat" in attempt.stdout, attempt.stdout + attempt.stderr
    # The operator's tools present the token (FLWR_HOME/credentials.yaml) and get in.
    token = (coordinator.state / CONTROL_TOKEN).read_text().strip()
    assert list_nodes(address, ca, token).status_code == 200
    assert set(coordinator.institutions()) >= {"alpha", "beta"}
    assert token not in coordinator.log.read_text()


def test_the_coordinators_own_questions_get_the_cli_answer_without_a_process(coordinator, federation, monkeypatch,
                                                                             tmp_path):
    """The supervisor, `submit`'s follower and the console list runs and nodes in their own process
    (server/control.py): no process is started, the Control API still wants the token, and any
    failure is one line (the runs' answers are compared with the CLI's after the observed job)."""
    home, token = coordinator.state / "flwr-home", coordinator.state / CONTROL_TOKEN
    def stable(nodes: list[dict]) -> list[dict]:
        return [{key: value for key, value in node.items() if key != "online-elapsed"} for node in nodes]

    assert stable(control.ask(home, token, "supernode", "ls")["nodes"]) == stable(coordinator.flwr("supernode", "ls")["nodes"])

    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args}")

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "run", no_process)
        patched.setattr(subprocess, "Popen", no_process)
        names = {row["name"]: row["status"] for row in CoordinatorState(coordinator.state).institutions()}
    assert names == {"alpha": "online", "beta": "online"}
    assert link_chores.PACED in coordinator.log.read_text()  # and the SuperLink's chores are paced
    wrong = tmp_path / "wrong.token"
    wrong.write_text("0" * 64)
    with pytest.raises(control.ControlError, match="uthenticat"):
        control.ask(home, wrong, "ls")
    for args in (("ls",), ("ls", "--run-id", "1")):
        with pytest.raises(control.ControlError) as missing:
            control.ask(home, tmp_path / "no.token", *args)
        assert "\n" not in str(missing.value) and "no.token" in str(missing.value)
    assert control.ask(home, token, "ls", "--run-id", str(2**64)) is None  # not a run id: the CLI's to refuse


def test_an_unreachable_superlink_is_flowers_one_line_reason(tmp_path):
    home = private_dir(tmp_path / "flwr-home")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        (home / "config.toml").write_text(tomli_w.dumps(
            {"superlink": {CONNECTION: {"address": address, "insecure": True}}}))
        (tmp_path / "token").write_text("0" * 64)
        with pytest.raises(control.ControlError) as refused:
            control.ask(home, tmp_path / "token", "supernode", "ls")
    assert "\n" not in str(refused.value) and "SuperLink" in str(refused.value), str(refused.value)


@pytest.mark.parametrize("side", ["coordinator", "institution"])
def test_a_task_claim_without_the_superexec_secret_is_refused(side, coordinator, federation):
    if side == "coordinator":
        address, ca, task = control_address(coordinator), coordinator.certs / "ca.pem", TaskType.SERVER_APP
        secret_file = coordinator.state / SUPEREXEC_SECRET
    else:
        address, ca, task = f"127.0.0.1:{supernode_port(federation, 'alpha')}", None, TaskType.CLIENT_APP
        secret_file = federation.folder / "alpha" / "state" / SUPEREXEC_SECRET
    claim = AcquireTaskRequest(supported_task_types=[task])
    intruder = runtime_client(address, None, ca, retry=False)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        intruder.AcquireTask(claim)
    assert refused.value.response.status_code == 401 and "Authentication failed" in refused.value.response.text
    wrong = runtime_client(address, b"x" * 32, ca, retry=False)
    with pytest.raises(httpx.HTTPStatusError):
        wrong.AcquireTask(claim)
    # With the secret (only the daemon's user can read it) the same call goes through; no job runs, so no task.
    answer = runtime_client(address, read_secret(secret_file), ca, retry=False).AcquireTask(claim)
    assert not answer.HasField("task")


@pytest.fixture(scope="module")
def observed_job(coordinator, federation, banking_slice, slice_labels, tmp_path_factory):
    """A 1-round job, with the coordinator's and both institutions' process trees sampled as it runs."""
    folder = tmp_path_factory.mktemp("observed-job")
    job = write_job(folder / "job.toml", banking_slice[1], slice_labels, federation={"rounds": 1})
    bundle = cli("server", "bundle", env=coordinator.env).stdout.strip()  # the checkout's hash now, not at module start
    for name in ("alpha", "beta"):
        approve(bundle, federation.folder / name / "state", coordinator.env)
    sampler = Sampler([coordinator.process.pid, *(process.pid for process in federation.started)])
    sampler.start()
    try:
        result = coordinator.run("submit", job, "--out", folder / "run", timeout=400)
    finally:
        seen = sampler.stop()
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr}\n{tail(federation.folder / 'alpha.log')}"
    return folder / "run", result, seen


def test_the_in_process_run_list_is_the_clis_after_a_job(observed_job, coordinator):
    home, token = coordinator.state / "flwr-home", coordinator.state / CONTROL_TOKEN
    [run] = control.ask(home, token, "ls")["runs"]
    assert run["status"] == "finished:completed"
    for args in (("ls",), ("ls", "--run-id", run["run-id"])):
        assert control.ask(home, token, *args) == coordinator.flwr(*args), args
    with pytest.raises(control.ControlError) as unknown:
        control.ask(home, token, "ls", "--run-id", str(int(run["run-id"]) ^ 1))
    cli = coordinator.flwr("ls", "--run-id", str(int(run["run-id"]) ^ 1))["error-message"]
    assert "\n" not in str(unknown.value) and cli.endswith(f"\n{unknown.value}"), (str(unknown.value), cli)


def test_every_process_of_a_deployment_listens_on_loopback_only(observed_job, coordinator):
    _, _, seen = observed_job
    assert_loopback_only(seen)  # the Fleet port too: the tests bind it to 127.0.0.1 (in production, it is public)
    ports = {port for _, _, port in seen.listeners}
    assert int(coordinator.fleet.rsplit(":", 1)[1]) in ports and int(control_address(coordinator).rsplit(":", 1)[1]) in ports
    print(f"\nlisteners: {sorted(seen.listeners)}")


def test_no_secret_or_task_token_is_on_a_command_line(observed_job, coordinator, federation):
    _, result, seen = observed_job
    apps = seen.programs("flwr-clientapp") + seen.programs("flwr-serverapp")
    assert seen.programs("flwr-serverapp") and seen.programs("flwr-clientapp"), "the job's app processes were not seen"
    for argv in apps:
        assert "--token" not in argv and "--token-file" in argv, argv
    hidden = [(coordinator.state / CONTROL_TOKEN).read_text().strip(), (coordinator.state / SUPEREXEC_SECRET).read_bytes().hex()]
    hidden += [(federation.folder / name / "state" / SUPEREXEC_SECRET).read_bytes().hex() for name in ("alpha", "beta")]
    everything = "\n".join(" ".join(argv) for argv in seen.cmdlines.values())
    logs = result.stdout + result.stderr + coordinator.log.read_text()
    logs += "".join((federation.folder / f"{name}.log").read_text() for name in ("alpha", "beta"))
    for secret in hidden:
        assert secret not in everything and secret not in logs
    # Token files live only while their app runs; `submit` can return while the ServerApp process is
    # still exiting (regression: a run of the whole suite saw its token file a moment before it went).
    deadline = time.monotonic() + 60
    for state in (coordinator.state, federation.folder / "alpha" / "state", federation.folder / "beta" / "state"):
        while (left := list((state / "tasks").glob("*.token"))) and time.monotonic() < deadline:
            time.sleep(1)
        assert left == []


def test_everything_written_is_owner_only(observed_job, coordinator, federation, env):
    run, _, _ = observed_job
    assert (run / "metrics.json").is_file()
    written = [coordinator.state, run, Path(env["FEDTUNE_CACHE_DIR"])]
    written += [federation.folder / name for name in ("alpha", "beta")]  # keys and state: ledger, cache, apps
    assert (federation.folder / "alpha" / "state" / "cache" / "features").is_dir()
    assert any((federation.folder / "alpha" / "state").rglob("ledger*"))
    for root in written:
        assert open_to_others(root) == [], root


# -- TLS on the two ports fedtune configures ------------------------------------------------------

def handshake(address: str, ca: Path, version: ssl.TLSVersion, ciphers: str | None = None) -> str | None:
    """The cipher the server chose for a client offering only `version` (and `ciphers`), or None if refused."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    if ciphers:
        context.set_ciphers(ciphers)
    try:
        with context.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname=host) as tls:
            return tls.cipher()[0]
    except (ssl.SSLError, ConnectionError):
        return None


def test_tls_versions_on_the_control_and_fleet_ports(coordinator):
    ca = coordinator.certs / "ca.pem"
    control = control_address(coordinator)
    assert handshake(control, ca, ssl.TLSVersion.TLSv1_3) is not None
    assert handshake(control, ca, ssl.TLSVersion.TLSv1_2) is None  # fedtune's SuperLink: TLS 1.3 only
    # The Fleet port is Flower's gRPC server: TLS 1.3, and TLS 1.2 with its two ECDHE-ECDSA AES-GCM
    # suites (forward secret, AEAD); nothing else. Python's gRPC cannot set a minimum version.
    assert handshake(coordinator.fleet, ca, ssl.TLSVersion.TLSv1_3) is not None
    offered = [c["name"] for c in ssl.create_default_context().get_ciphers() if c["protocol"] == "TLSv1.2"]
    accepted = {name for name in offered if handshake(coordinator.fleet, ca, ssl.TLSVersion.TLSv1_2, name) == name}
    assert accepted == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"}


# -- a Ray simulation -----------------------------------------------------------------------------

def ask_ray_gcs(gcs: str, token: str | None) -> grpc.StatusCode:
    """What Ray's GCS answers a local process asking for the cluster's id (the first call of any
    process joining the cluster, which could then run any code as the simulation's user)."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(gcs) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_simulation_listens_on_loopback_only_and_writes_owner_only(banking_slice, tmp_path, env):
    train, test = banking_slice
    out, cache, token = tmp_path / "run", tmp_path / "cache", secrets.token_hex(32)
    command = [sys.executable, "-m", "simulations.cli", "--train", train, "--test", test, "--institutions", "2",
               "--rounds", "1", "--batch-size", "48", "--secure-aggregation", "off", "--out", out]
    with (tmp_path / "sim.log").open("w") as log:
        sim = subprocess.Popen(list(map(str, command)), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(env, FEDTUNE_CACHE_DIR=str(cache), RAY_AUTH_TOKEN=token))
    sampler = Sampler([sim.pid])
    sampler.start()
    try:
        deadline = time.monotonic() + 120
        while not (gcs := [port for program, _, port in set(sampler.seen.listeners) if program == "gcs_server"]):
            assert sim.poll() is None and time.monotonic() < deadline, tail(tmp_path / "sim.log")
            time.sleep(0.2)
        assert ask_ray_gcs(f"127.0.0.1:{gcs[0]}", None) == grpc.StatusCode.UNAUTHENTICATED
        assert ask_ray_gcs(f"127.0.0.1:{gcs[0]}", "0" * 64) == grpc.StatusCode.UNAUTHENTICATED
        assert ask_ray_gcs(f"127.0.0.1:{gcs[0]}", token) == grpc.StatusCode.OK  # the simulation's own processes
        code = sim.wait(300)
    finally:
        seen = sampler.stop()
        if sim.poll() is None:
            sim.kill()
    assert code == 0, tail(tmp_path / "sim.log")
    assert {"gcs_server", "raylet"} <= {program for program, _, _ in seen.listeners}, seen.listeners
    assert_loopback_only(seen)
    print(f"\nRay listeners: {sorted(seen.listeners)}")
    for root in (out, cache):
        assert open_to_others(root) == [], root
