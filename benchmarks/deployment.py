"""Benchmark: rounds over TLS on Flower's deployment runtime, 2 and 3 institutions, SecAgg+ on and off.

Starts a real coordinator (`fedtune-server start`, TLS + node authentication) and institutions
(`fedtune-client start`) on 127.0.0.1, the way docs/operators.md does, and submits the same job
with secure aggregation on and off. Prints one table: wall time per round, the slowest
institution's DP-SGD time in it, the rest (coordination overhead: Flower's 3 s polls, one process
per message, model loading, SecAgg+'s extra exchanges), and payload bytes per institution per round.
Rounds after the first are averaged (the first also fills each institution's feature cache).
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

import tomli_w

from common.config import BANKING77, REPO_ROOT
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

    def start(self, name: str, tool: str, *args, ready: str) -> None:
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

    def start_coordinator(self) -> None:
        certs = self.folder / "ca"
        self.cli("server", "ca", "init", "--dir", certs)
        self.cli("server", "cert", "issue", "--dir", certs)
        self.start("coordinator", "server", "start", "--state-dir", self.state, "--certs", certs,
                   "--port", free_port(), "--fleet-address", self.fleet, ready="fedtune-server: ready")

    def add_institution(self, name: str, data: Path, bundle: str) -> None:
        folder = self.folder / name
        self.cli("client", "keygen", "--out", folder)
        self.cli("server", "admit", folder / "node.pub", "--name", name, "--state-dir", self.state)
        self.cli("client", "approve", bundle, "--state-dir", folder / "state")
        self.start(name, "client", "start", "--superlink", self.fleet, "--root-certificates",
                   self.folder / "ca" / "ca.pem", "--private-key", folder / "node.key", "--data", data, "--name", name,
                   "--device", "cpu", "--state-dir", folder / "state", "--port", free_port(),
                   "--budget-epsilon", 1000, "--budget-delta", 1e-5, ready="SuperNode ID")

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


def job(institutions: int, rounds: int, secure: bool, labels: list[str]) -> dict:
    return {
        "data": {"test_path": str(BANKING77 / "test.csv"), "labels": labels},
        "federation": {"institutions": institutions, "rounds": rounds},
        "privacy": {"target_epsilon": 8.0},
        "secure_aggregation": {"enabled": secure},
        "training": {"batch_size": 256, "threads": 1},
    }


def row(institutions: int, secure: bool, metrics: dict) -> str:
    rounds = metrics["rounds"]
    later = [(now["seconds"] - before["seconds"], now["slowest_training_seconds"])
             for before, now in zip(rounds[1:], rounds[2:])]
    wall = sum(w for w, _ in later) / len(later)
    training = sum(t for _, t in later) / len(later)
    first = rounds[1]["seconds"] - rounds[0]["seconds"]
    trained = len(rounds) - 1
    up = sum(i["bytes_up"] for i in metrics["institutions"]) / len(metrics["institutions"]) / trained
    down = sum(i["bytes_down"] for i in metrics["institutions"]) / len(metrics["institutions"]) / trained
    return (f"| {institutions} | {'on' if secure else 'off'} | {first:.1f} | {wall:.1f} | {training:.2f} | "
            f"{wall - training:.1f} | {up:,.0f} / {down:,.0f} | {rounds[-1]['accuracy']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=600, help="training records per institution")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-"))
    with (BANKING77 / "train.csv").open(encoding="utf-8", newline="") as handle:
        labels = sorted({row["category"] for row in csv.DictReader(handle)})
    lines = []
    with ExitStack() as stack:
        consortium = Consortium(folder, stack)
        consortium.start_coordinator()
        bundle = consortium.cli("server", "bundle").strip()
        files = split_data(folder, args.records, len(INSTITUTIONS))
        for count in (2, 3):
            while len(list(folder.glob("st-*.log"))) < count:
                index = len(list(folder.glob("st-*.log")))
                consortium.add_institution(INSTITUTIONS[index], files[index], bundle)
            for secure in (True, False):
                name = f"n{count}-{'secagg' if secure else 'plain'}"
                lines.append(row(count, secure, consortium.submit(job(count, args.rounds, secure, labels), name)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; command: python benchmarks/deployment.py "
          f"--rounds {args.rounds} --records {args.records}")
    print("| institutions | SecAgg+ | round 1 (s) | later rounds (s) | slowest DP-SGD (s) | coordination (s) "
          "| bytes per institution per round (up / down) | final accuracy |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines))
    print(f"work folder: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
