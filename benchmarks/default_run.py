"""Benchmark: the default `fedtune-sim` job, cold (empty feature cache), measured from outside.

Prints one table: wall time, peak memory of the whole process tree (driver, Ray, actors),
final accuracy, epsilon per institution and payload bytes per round. Extra arguments go to
fedtune-sim unchanged, e.g. `python benchmarks/default_run.py --rounds 10`.
Run by hand; record the output, the machine and the command in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.5


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    out = work / "run"
    env = dict(os.environ, FEDTUNE_CACHE_DIR=str(work / "cache"))
    command = [sys.executable, "-m", "simulations.cli", "--out", str(out), *sys.argv[1:]]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    if child.returncode != 0:
        print(f"fedtune-sim failed with exit code {child.returncode}")
        return 1
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    rounds = len(metrics["rounds"]) - 1
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"command: {' '.join(['python benchmarks/default_run.py', *sys.argv[1:]])}")
    print("| measure | value |\n|---|---|")
    print(f"| wall time, whole command | {wall:.1f} s |")
    print(f"| wall time, ServerApp (rounds + evaluation + export) | {metrics['wall_seconds']:.1f} s |")
    print(f"| peak memory, process tree | {peak / 2**30:.2f} GiB |")
    print(f"| final test accuracy (round {last['round']}) | {last['accuracy']:.4f} |")
    print(f"| best test accuracy | {max(r['accuracy'] for r in metrics['rounds']):.4f} |")
    for inst in metrics["institutions"]:
        print(f"| {inst['name']}: records / epsilon / delta / noise / steps | {inst['examples']} / "
              f"{inst['epsilon']:.3f} / {inst['delta']:g} / {inst['noise_multiplier']:.3f} / {inst['steps']} |")
    up = sum(r["bytes_up"] for r in metrics["rounds"][1:]) / rounds
    down = sum(r["bytes_down"] for r in metrics["rounds"][1:]) / rounds
    print(f"| payload bytes per round, all institutions (up / down) | {up:,.0f} / {down:,.0f} |")
    print(f"run folder: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
