"""What a round's checkpoint costs the coordinator (server/checkpoint.py): write (encode, SHA-256,
fsync, rename) and read back (verify, decode), for the default job's update and a 100 MB one, with
FedAvg (weights only) and FedAdam (weights, its own copy and two moments: four times the arrays).

    .venv/bin/python benchmarks/checkpoint_cost.py [--folder DIR] [--repeats N]

The folder should be on the disk the run folders live on (default: a temporary folder under /tmp).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from server import checkpoint
from server.checkpoint import Checkpoint

DEFAULT_JOB_PARAMETERS = 37_325  # trainable parameters of the default job (BENCHMARKS.md, issue 2)
HUNDRED_MB = 100 * 2**20 // 4  # float32 parameters in a 100 MiB update


def case(parameters: int, fedadam: bool) -> Checkpoint:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(parameters, dtype=np.float32)]
    arrays = {name: [rng.standard_normal(parameters, dtype=np.float32)] for name in ("current_weights", "m_t", "v_t")}
    return Checkpoint("job-0123456789abcdef", 1, "{}", weights, {"arrays": arrays if fedadam else {}, "values": {}},
                      {}, {0: {"loss": 1.0}})


def timed(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        print(f"| update | strategy | checkpoint file | write (median of {args.repeats}) | read + verify |")
        print("|---|---|---:|---:|---:|")
        for label, parameters in (("default job (37,325 parameters)", DEFAULT_JOB_PARAMETERS), ("100 MiB", HUNDRED_MB)):
            for fedadam in (False, True):
                saved = case(parameters, fedadam)
                path = checkpoint.save(folder, saved)
                write = timed(lambda: checkpoint.save(folder, saved), args.repeats)
                read = timed(lambda: checkpoint.latest(folder), args.repeats)
                print(f"| {label} | {'fedadam' if fedadam else 'fedavg'} | {path.stat().st_size / 2**20:.1f} MiB | "
                      f"{write * 1000:.0f} ms | {read * 1000:.0f} ms |")


if __name__ == "__main__":
    main()
