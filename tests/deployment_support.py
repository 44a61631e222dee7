"""Real coordinator and institution processes for the deployment tests, shared by their modules.

Everything runs on 127.0.0.1 with ports chosen at run time. Certificates come from
`fedtune-server`, node keys from `fedtune-client`; every process is stopped by its fixture, on
pass or fail. Import the fixtures a test module needs by name.
"""
from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w

from common.config import REPO_ROOT
from common.processes import FlowerProcess, flower_env, flower_executable


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
    process: FlowerProcess | None = None  # `fedtune-server start`, when started by start_coordinator

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return cli("server", *args, "--state-dir", self.state, env=self.env, timeout=timeout)

    def institutions(self) -> dict[str, str]:
        result = self.run("institutions")
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()[1:]]
        return {row[0]: row[2] for row in rows if len(row) >= 3}

    def flwr(self, *args: str) -> dict:
        """Flower's CLI's own answer (`flwr ARGS fedtune --format json`), run as the operator."""
        result = subprocess.run([flower_executable("flwr"), *args, "fedtune", "--format", "json"], capture_output=True,
                                text=True, env=flower_env(self.state / "flwr-home"), timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def runs(self) -> list[dict]:
        """Flower's own record of the runs (`flwr ls`), not fedtune's."""
        answer = self.flwr("ls")
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
    return Coordinator(state, certs, fleet, log, env, process)


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


# Every institution sets its own budget (epsilon and delta) when it starts; the daemon refuses to start without one.
TEST_BUDGET = ("--budget-epsilon", "100", "--budget-delta", "1e-5")


def start_institution(procs: Processes, coordinator: Coordinator, name: str, data: Path,
                      ca: Path | None = None, key: Path | None = None, budget: tuple[str, ...] = TEST_BUDGET):
    folder = procs.folder / name
    if key is None:
        made = cli("client", "keygen", "--out", folder, env=coordinator.env)
        assert made.returncode == 0, made.stderr
        key = folder / "node.key"
    process, log = procs.start(
        name, "client", "start", "--superlink", coordinator.fleet,
        "--root-certificates", ca or coordinator.certs / "ca.pem", "--private-key", key,
        "--data", data, "--name", name, "--device", "cpu", "--state-dir", folder / "state", "--port", free_port(),
        *budget,
    )
    return process, log, folder


def approve(bundle: str, state_dir: Path, env: dict) -> None:
    """What each institution operator does once the coordinator has sent them the bundle's hash."""
    result = cli("client", "approve", bundle, "--state-dir", state_dir, env=env)
    assert result.returncode == 0, result.stderr


def wait_for_exit(process: FlowerProcess, log: Path, timeout: float) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the institution is still running after {timeout:.0f} s:\n{tail(log)}")


@pytest.fixture(scope="module")
def bundle(env) -> str:
    """The hash of the app bundle this checkout's `submit` ships, as the coordinator operator reads it."""
    result = cli("server", "bundle", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def join(procs: Processes, coordinator: Coordinator, data_files: dict[str, Path], bundle: str, env: dict) -> None:
    """Each institution makes its key, is admitted, approves the bundle and starts its node; until all are online.
    Each institution's files are under `procs.folder / name` (its ledger in `state/`)."""
    for name, data in data_files.items():
        assert cli("client", "keygen", "--out", procs.folder / name, env=env).returncode == 0
        admitted = coordinator.run("admit", procs.folder / name / "node.pub", "--name", name)
        assert admitted.returncode == 0, admitted.stderr
        approve(bundle, procs.folder / name / "state", env)
        start_institution(procs, coordinator, name, data, key=procs.folder / name / "node.key")
    for name in data_files:
        coordinator.wait_for(name, "online")


@pytest.fixture(scope="module")
def federation(coordinator, data_files, bundle, tmp_path_factory, env):
    """Two admitted institutions, online, that approved the app bundle of this checkout."""
    procs = Processes(tmp_path_factory.mktemp("federation"), env)
    try:
        join(procs, coordinator, data_files, bundle, env)
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
