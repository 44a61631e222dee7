"""Benchmark: the simulation at N = 4, 16, 64 and 100 institutions, SecAgg+ on, BANKING77 split N ways.

For each N it runs `fedtune-sim --institutions N` (the default job otherwise: epsilon 8 per
institution, the batch following each institution's size) in its own process and prints one row:
seconds per round (the first round, which also encodes each institution's features and plans its
noise, apart), peak memory of the whole process tree, payload bytes per institution per round, the
final accuracy and the largest epsilon any institution spent. Then it measures SecAgg+'s own
per-institution cost with every institution a neighbour and with `server.strategy.secagg_shares`,
by driving Flower's `secaggplus_mod` stages for one neighbourhood.

    python benchmarks/scale.py --rounds 4:20,16:5,64:3,100:2 [--fraction 100:0.2] [-- extra fedtune-sim flags]

`--rounds N:R` sets the rounds of the job with N institutions (default 2 each): on 2 cores the
large federations get few rounds, so their accuracy is that of a short job. The feature cache is
shared between the runs (the coordinator's test-set features are encoded once). Run by hand;
record the output, the machine and the command in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_run import SAMPLE_SECONDS, tree_rss  # noqa: E402


def pairs(text: str, kind=int) -> dict[int, float]:
    return {int(n): kind(v) for n, v in (item.split(":") for item in text.split(",") if item)}


def run_job(n: int, rounds: int, fraction: float, work: Path, extra: list[str]) -> dict:
    out = work / f"n{n}"
    command = [sys.executable, "-m", "simulations.cli", "--institutions", str(n), "--rounds", str(rounds),
               "--fraction-per-round", str(fraction), "--out", str(out), *extra]
    env = dict(os.environ, FEDTUNE_CACHE_DIR=str(work / "cache"))
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"n{n}.log", "w"))
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(SAMPLE_SECONDS)
    wall = time.perf_counter() - started
    if child.returncode != 0 or not (out / "metrics.json").is_file():
        return {"n": n, "failed": f"exit code {child.returncode}, see {work / f'n{n}.log'}"}
    metrics = json.loads((out / "metrics.json").read_text())
    rounds_ = metrics["rounds"]
    seconds = [b["seconds"] - a["seconds"] for a, b in zip(rounds_, rounds_[1:])]
    per_inst = [(r["bytes_up"] + r["bytes_down"]) / max(1, len(r["took_part"])) for r in rounds_[1:]]
    released = [i for i in metrics["institutions"] if i["rounds"]]
    return {
        "n": n, "rounds": rounds, "per_round": metrics["config"]["federation"]["fraction_per_round"],
        "asked": sum(len(r["asked"]) for r in rounds_[1:]) / max(1, len(rounds_) - 1),
        "wall": wall, "first": seconds[0], "later": sum(seconds[1:]) / len(seconds[1:]) if seconds[1:] else None,
        "peak": peak, "bytes": sum(per_inst) / len(per_inst), "accuracy": rounds_[-1]["accuracy"],
        "epsilon": max(i["epsilon"] for i in released), "rate": sorted({i["sample_rate"] for i in released}),
        "records": sorted(i["examples"] for i in released), "params": metrics.get("trainable_parameters"),
        "shares": (metrics.get("secure_aggregation_neighbours") or {}).get("shares"),
    }


def secagg_cost(neighbours: int, params: int, threshold_share: float) -> tuple[float, float]:
    """Seconds of SecAgg+'s dominant work per institution and round with `neighbours` (itself included),
    with Flower's own primitives as `secaggplus_mod` calls them: the institution splits two secrets into
    `neighbours` shares and derives, encrypts and masks with each neighbour; the coordinator rebuilds the
    institution's mask seed from `threshold` shares."""
    import os as os_

    import numpy as np
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt, generate_shared_key
    from flwr.supercore.primitives.asymmetric import generate_key_pairs
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen, share_keys_plaintext_concat

    threshold = max(2, round(threshold_share * neighbours))
    own, peers = generate_key_pairs(), [generate_key_pairs() for _ in range(neighbours - 1)]
    seed, secret = os_.urandom(32), os_.urandom(32)
    started = time.perf_counter()
    seed_shares = create_shares(seed, threshold, neighbours)
    key_shares = create_shares(secret, threshold, neighbours)
    dims = [(params,)]
    masked = [np.zeros(params, dtype=np.int64)]
    for index, (_, public) in enumerate(peers, start=1):
        key = generate_shared_key(own[0], public)  # the share channel and the pairwise mask
        encrypt(key, share_keys_plaintext_concat(1, index + 1, seed_shares[index], key_shares[index]))
        masked = [m + p for m, p in zip(masked, pseudo_rand_gen(key, 2**32, dims))]
    client = time.perf_counter() - started
    started = time.perf_counter()
    combine_shares(seed_shares[:threshold])
    return client, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,16,64,100")
    parser.add_argument("--rounds", default="", help="N:R,... rounds per size (default 2)")
    parser.add_argument("--fraction", default="", help="N:F,... federation.fraction_per_round per size (default 1)")
    parser.add_argument("extra", nargs="*", help="after --: fedtune-sim flags for every run")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rounds, fractions = pairs(args.rounds), pairs(args.fraction, float)
    work = Path(tempfile.mkdtemp(prefix="fedtune-scale-"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
          f"load {os.getloadavg()[0]:.1f} at start; command: python benchmarks/scale.py {' '.join(sys.argv[1:])}",
          flush=True)
    print("| N | rounds | asked per round | records per institution | sample rates | first round s | later rounds s "
          "| wall s | peak memory GiB | bytes per institution per round | final accuracy | max epsilon |", flush=True)
    print("|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    rows = []
    for n in sizes:
        row = run_job(n, int(rounds.get(n, 2)), fractions.get(n, 1.0), work, args.extra)
        rows.append(row)
        if "failed" in row:
            print(f"| {n} | failed: {row['failed']} |", flush=True)
            continue
        later = f"{row['later']:.1f}" if row["later"] is not None else "-"
        print(f"| {n} | {row['rounds']} | {row['asked']:.0f} | {row['records'][0]}-{row['records'][-1]} | "
              f"{', '.join(f'{r:.3g}' for r in row['rate'])} | {row['first']:.1f} | {later} | {row['wall']:.0f} | "
              f"{row['peak'] / 2**30:.2f} | {row['bytes']:,.0f} | {row['accuracy']:.4f} | {row['epsilon']:.3f} |",
              flush=True)
    params = next((row["params"] for row in rows if row.get("params")), 40_000)
    from common.config import load_config
    from server.strategy import secagg_shares

    threshold = load_config().secure_aggregation.reconstruction_threshold
    print(f"\nSecAgg+ per round, {params:,} trainable parameters: seconds per institution (its four stages) and "
          "the coordinator's seed reconstruction per institution", flush=True)
    print("| institutions per round | neighbours | institution s | coordinator s per institution |\n|---:|---:|---:|---:|")
    for n in sizes:
        for hood in sorted({n, n if isinstance(secagg_shares(n), float) else secagg_shares(n)}, reverse=True):
            client, server = secagg_cost(hood, params, threshold)
            print(f"| {n} | {hood} | {client:.3f} | {server:.4f} |", flush=True)
    print(f"run folders: {work}")
    return 0 if all("failed" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
