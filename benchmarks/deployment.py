"""Benchmark: SecAgg+ rounds over TLS on Flower's deployment runtime, 2 and 3 institutions, Flower's
pace against fedtune's, side by side.

Starts a real coordinator (`fedtune-server start`, TLS + node authentication) and institutions
(`fedtune-client start`) on 127.0.0.1, the way docs/operators.md does, and submits the same job
with each `pace` setting (common/config.py): "flower" (Flower 1.39's fixed 3 s sleeps on both
sides, as before) and "fast" (server/polling.py, client/supernode.py, server/link_chores.py, and ClientApps
started warm); the coordinator and the institutions are restarted with the matching `--pace`. Prints one table: wall time per round, the slowest
institution's DP-SGD time in it (as reported: whole seconds, rounded up), the rest (coordination:
polls, one process per message, imports, model loading, SecAgg+'s four exchanges), and payload
bytes per institution per round; then what one training message's ClientApp process spends its
time on. Rounds after the first are averaged (the first also fills each institution's feature cache).
Run by hand: `python benchmarks/deployment.py [--rounds 3] [--records 600]`; record the output,
the machine and the command in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import get_args

import tomli_w

from common.config import BANKING77, REPO_ROOT, Pace
from common.processes import FlowerProcess, flower_env

INSTITUTIONS = ("st-mary", "st-john", "st-luke")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Consortium:
    """A coordinator and its institutions as real processes under one folder."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder, self.stack = folder, stack
        self.env = flower_env(folder / "flwr-home", {"FEDTUNE_CACHE_DIR": str(folder / "cache")})
        self.state = folder / "coordinator"
        self.fleet = f"127.0.0.1:{free_port()}"

    def cli(self, tool: str, *args) -> str:
        result = subprocess.run([sys.executable, "-m", f"{tool}.cli", *map(str, args)], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise SystemExit(f"{tool} {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return result.stdout

    def start(self, name: str, tool: str, *args, ready: str) -> FlowerProcess:
        log = self.folder / f"{name}.log"
        with log.open("w") as handle:
            process = FlowerProcess([sys.executable, "-m", f"{tool}.cli", *map(str, args)], self.env, cwd=REPO_ROOT,
                                    stdout=handle)
        self.stack.callback(process.stop)
        deadline = time.monotonic() + 180
        while ready not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        return process

    def start_coordinator(self, pace: str) -> FlowerProcess:
        certs = self.folder / "ca"
        if not certs.exists():
            self.cli("server", "ca", "init", "--dir", certs)
            self.cli("server", "cert", "issue", "--dir", certs)
        return self.start("coordinator", "server", "start", "--state-dir", self.state, "--certs", certs,
                          "--port", free_port(), "--fleet-address", self.fleet, "--pace", pace,
                          ready="fedtune-server: ready")

    def admit(self, name: str, bundle: str) -> None:
        folder = self.folder / name
        self.cli("client", "keygen", "--out", folder)
        self.cli("server", "admit", folder / "node.pub", "--name", name, "--state-dir", self.state)
        self.cli("client", "approve", bundle, "--state-dir", folder / "state")

    def start_institution(self, name: str, data: Path, pace: str) -> FlowerProcess:
        folder = self.folder / name
        return self.start(name, "client", "start", "--superlink", self.fleet, "--root-certificates",
                          self.folder / "ca" / "ca.pem", "--private-key", folder / "node.key", "--data", data,
                          "--name", name, "--device", "cpu", "--state-dir", folder / "state", "--port", free_port(),
                          "--budget-epsilon", 1000, "--budget-delta", 1e-5, "--pace", pace, ready="SuperNode ID")

    def submit(self, job: dict, name: str) -> dict:
        path = self.folder / f"{name}.toml"
        path.write_text(tomli_w.dumps(job))
        self.cli("server", "submit", path, "--out", self.folder / name, "--quiet", "--state-dir", self.state)
        return json.loads((self.folder / name / "metrics.json").read_text())


def split_data(folder: Path, records: int, parts: int) -> list[Path]:
    with (BANKING77 / "train.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[: records * parts]
    files = []
    for index in range(parts):
        files.append(folder / f"part-{index}.csv")
        with files[-1].open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "category"])
            writer.writeheader()
            writer.writerows(rows[index::parts])
    return files


def job(institutions: int, rounds: int, pace: str, labels: list[str]) -> dict:
    return {
        "data": {"test_path": str(BANKING77 / "test.csv"), "labels": labels},
        "federation": {"institutions": institutions, "rounds": rounds, "pace": pace},
        "privacy": {"target_epsilon": 8.0},
        "secure_aggregation": {"enabled": True},
        "training": {"batch_size": 256, "threads": 1},
    }


def later_rounds(metrics: dict) -> tuple[float, float]:
    """Mean (wall, slowest DP-SGD) seconds of the rounds after the first."""
    rounds = metrics["rounds"]
    later = [(now["seconds"] - before["seconds"], now["slowest_training_seconds"])
             for before, now in zip(rounds[1:], rounds[2:])]
    return sum(w for w, _ in later) / len(later), sum(t for _, t in later) / len(later)


def row(institutions: int, pace: str, metrics: dict, flower: dict) -> str:
    rounds = metrics["rounds"]
    wall, training = later_rounds(metrics)
    first = rounds[1]["seconds"] - rounds[0]["seconds"]
    trained = len(rounds) - 1
    up = sum(i["bytes_up"] for i in metrics["institutions"]) / len(metrics["institutions"]) / trained
    down = sum(i["bytes_down"] for i in metrics["institutions"]) / len(metrics["institutions"]) / trained
    return (f"| {institutions} | {pace} | {first:.1f} | {wall:.1f} | {training:.1f} | {wall - training:.1f} | "
            f"{later_rounds(flower)[0] / wall:.2f} | {up:,.0f} / {down:,.0f} | {rounds[-1]['accuracy']:.3f} |")


# One training message's ClientApp work, step by step as client/round.py does it, in a fresh
# process as Flower starts one per message.
PHASES = """
import json, sys, time
from pathlib import Path
started = time.perf_counter()
marks = {}
def mark(name):
    global started
    now = time.perf_counter()
    marks[name] = round(now - started, 2)
    started = now
import client.app
mark("Flower + ClientApp imports")
import client.round as r
from common.config import JobConfig, NodeConfig
from common.models.device import pick_device
from common.models.kinds import model_kind
mark("training imports (torch, transformers, peft, Opacus)")
job = JobConfig.model_validate({"data": {"labels": json.loads(sys.argv[2])}})
node = NodeConfig(name="profile", data_path=Path(sys.argv[1]), cache_dir=Path(sys.argv[3]))
local = r.load_local_data(job, node)
mark("data read + hash")
kind = model_kind(job.model)
model = kind.build_model(job.model, job.data.labels, pick_device("cpu"))
mark("model build")
kind.encode(model, job.model, local.records, node.cache_dir)
mark("features (encode, or cache load)")
print(json.dumps(marks))
"""


def message_phases(data: Path, labels: list[str], cache: Path) -> dict[str, float]:
    """Seconds per phase of one fresh process; 'process start + exit' is what the phases leave out."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PHASES, str(data), json.dumps(labels), str(cache)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600, check=True)
    phases = json.loads(result.stdout.strip().splitlines()[-1])
    return {"process start + exit": round(time.perf_counter() - started - sum(phases.values()), 2), **phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=600, help="training records per institution")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-"))
    loaded = os.getloadavg()[0]  # the machine is shared: say how busy it was
    with (BANKING77 / "train.csv").open(encoding="utf-8", newline="") as handle:
        labels = sorted({row["category"] for row in csv.DictReader(handle)})
    lines = []
    with ExitStack() as stack:
        consortium = Consortium(folder, stack)
        admitting = consortium.start_coordinator("flower")
        bundle = consortium.cli("server", "bundle").strip()
        files = split_data(folder, args.records, len(INSTITUTIONS))
        for name in INSTITUTIONS:
            consortium.admit(name, bundle)
        admitting.stop()
        for count in (2, 3):
            results = {}
            for pace in get_args(Pace)[::-1]:  # Flower's first, then fedtune's
                processes = [consortium.start_coordinator(pace)]
                processes += [consortium.start_institution(INSTITUTIONS[i], files[i], pace) for i in range(count)]
                results[pace] = consortium.submit(job(count, args.rounds, pace, labels), f"n{count}-{pace}")
                for process in processes[::-1]:
                    process.stop()
            lines += [row(count, pace, metrics, results["flower"]) for pace, metrics in results.items()]
    cold = message_phases(files[0], labels, folder / "phases-cache")
    warm = message_phases(files[0], labels, folder / "phases-cache")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {loaded:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end; command: python benchmarks/deployment.py --rounds {args.rounds} "
          f"--records {args.records}")
    print("| institutions | pace | round 1 (s) | later rounds (s) | slowest DP-SGD (s) | coordination (s) "
          "| speed-up vs flower | bytes per institution per round (up / down) | final accuracy |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    print(f"\none training message's ClientApp process, {args.records} records (s)")
    print("| phase | first message (cold feature cache) | later messages |")
    print("|---|---:|---:|")
    print("\n".join(f"| {phase} | {cold[phase]:.2f} | {warm[phase]:.2f} |" for phase in cold))
    print(f"work folder: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
