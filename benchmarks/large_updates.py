"""Benchmark: 10 MB and 100 MB float32 updates through fedtune's rounds, SecAgg+ on and off.

An LLM adapter is tens of MB (LoRA r=16 on all seven projections of a 7B Llama: about 40M
parameters). This moves updates of that size through the path every fedtune job takes: Flower's
simulation engine (simulations/engine.py), the coordinator's workflow and strategy
(`server.strategy.make_workflow` / `make_strategy`, so `CheckedUpdates` and the SecAgg+ settings
fedtune sets), its `RecordingGrid` byte counts and polling, and the institution's
`secure_aggregation_mod` (client/app.py: Flower's `secaggplus_mod` on a float64 copy). What is
not real is the training: each institution returns the global weights plus a constant of its own,
so the coordinator can check the decoded average to the last bit it should hold.

For each size and SecAgg+ setting, one job of `--institutions` institutions and `--rounds` rounds
runs in its own process; the table has one row per round: seconds per phase (each of SecAgg+'s four
exchanges, or the one plain training exchange; then the coordinator's decoding and averaging),
bytes down/up per institution, the global model's dtype after the round (what the next round
downloads), the largest error of the average, and the job's peak memory (the whole process tree).

    python benchmarks/large_updates.py [--sizes 10,100] [--institutions 2] [--rounds 2]

Run by hand; record the output, the machine and the command in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from default_run import SAMPLE_SECONDS, tree_rss  # noqa: E402

MB = 2**20
ARRAY_FLOATS = MB // 4  # an update as tensors of 1 MiB each (a LoRA update is hundreds of tensors)
STEP = 1e-3  # institution k returns the global weights + (k + 1) * STEP
WEIGHT = 500  # each institution's reported weight (its records), as a real one reports
SIZE_ENV = "FEDTUNE_BENCH_UPDATE_MB"


def initial_weights(megabytes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.02, ARRAY_FLOATS).astype(np.float32) for _ in range(megabytes)]


def apps():
    """The benchmark's ServerApp and ClientApp (imported in the job's process only: Flower, Ray)."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.server import LegacyContext, ServerConfig
    from flwr.serverapp import ServerApp
    from flwr.compat.common import recorddict_compat as compat

    from client.app import secure_aggregation_mod
    from common import messages as m
    from common.config import OUT_DIR_KEY, RUN_CONFIG_KEY, JobConfig
    from server.grid_decorator import GridDecorator
    from server.polling import waiting_grid
    from server.round_log import RecordingGrid, RoundLog
    from server.strategy import LeastAskedFirst, make_strategy, make_workflow

    marks: list[tuple[str, float, float]] = []  # (phase, start, end) in the coordinator's clock

    class TimingGrid(GridDecorator):
        """Each exchange's wall time, named by its SecAgg+ stage (or 'train')."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            configs = messages[0].content.config_records.get(RECORD_KEY_CONFIGS, {}) if messages else {}
            started = time.perf_counter()
            replies = list(self.grid.send_and_receive(messages, timeout=timeout))
            marks.append((str(configs.get(Key.STAGE, "train")), started, time.perf_counter()))
            return replies

    def coordinator(grid, context):
        job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
        out = Path(str(context.run_config[OUT_DIR_KEY]))
        previous = initial_weights(int(os.environ[SIZE_ENV]))
        shift = STEP * (job.federation.institutions + 1) / 2  # the mean of the institutions' constants
        rounds: list[dict] = []

        def evaluate(server_round, weights, config):
            nonlocal previous
            now = time.perf_counter()
            if server_round > 0:
                error = max(float(np.abs(w.astype(np.float64) - p - shift).max()) for w, p in zip(weights, previous))
                rounds.append({"round": server_round, "dtype": str(weights[0].dtype), "error": error,
                               "marks": list(marks), "evaluated": now})
            marks.clear()
            marks.append(("start", now, now))
            previous = [w.astype(np.float64) for w in weights]
            return 0.0, {}

        round_log = RoundLog()
        strategy = make_strategy(job, ndarrays_to_parameters(previous), evaluate, round_log)
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=job.federation.rounds), strategy=strategy,
                               client_manager=LeastAskedFirst())
        grid = RecordingGrid(TimingGrid(waiting_grid(grid, job.federation.pace)), round_log,
                             job.federation.round_timeout)
        make_workflow(job)(grid, legacy)
        for row in rounds:
            sent = round_log.node_bytes.get(row["round"], {}).values()
            row["down"], row["up"] = (max(s[i] for s in sent) for i in (0, 1))
        (out / "metrics.json").write_text(json.dumps({"rounds": rounds}))

    server_app = ServerApp()
    server_app.main()(coordinator)
    client_app = ClientApp(mods=[secure_aggregation_mod])

    @client_app.train()
    def train(msg, context):
        fit = compat.recorddict_to_fitins(msg.content, keep_input=True)
        partition = int(context.node_config["partition-id"])
        update = [(w + STEP * (partition + 1)).astype(np.float32) for w in parameters_to_ndarrays(fit.parameters)]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), WEIGHT, {m.INSTITUTION: f"i{partition}"})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return server_app, client_app


def one_job(megabytes: int, secagg: bool, institutions: int, rounds: int, out: Path) -> None:
    """The job of one row group, in this process."""
    from common.config import JobConfig
    from simulations.engine import simulate

    os.environ[SIZE_ENV] = str(megabytes)
    job = JobConfig.model_validate({"federation": {"institutions": institutions, "rounds": rounds},
                                    "secure_aggregation": {"enabled": secagg}})
    server_app, client_app = apps()
    simulate(job, out, out / "state", server_app=server_app, client_app=client_app)


def run_child(megabytes: int, secagg: bool, args, work: Path) -> dict:
    out = work / f"{megabytes}mb-{'secagg' if secagg else 'plain'}"
    out.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", str(megabytes), str(int(secagg)), str(out),
               "--institutions", str(args.institutions), "--rounds", str(args.rounds)]
    log = open(out / "job.log", "w")
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        peak = max(peak, tree_rss(root))
        time.sleep(SAMPLE_SECONDS)
    if child.returncode != 0 or not (out / "metrics.json").is_file():
        raise SystemExit(f"{megabytes} MB, secagg={secagg}: exit code {child.returncode}, see {out / 'job.log'}")
    return {"peak": peak, **json.loads((out / "metrics.json").read_text())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100", help="update sizes in MiB of float32")
    parser.add_argument("--institutions", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        one_job(int(args.child[0]), args.child[1] == "1", args.institutions, args.rounds, Path(args.child[2]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="fedtune-large-updates-"))
    loaded = os.getloadavg()[0]
    print("| update | SecAgg+ | round | setup s | share keys s | masked vectors s | unmask s | train s "
          "| coordinator decode + average s | round s | down / up MB per institution | global dtype after | "
          "max error of the average | peak memory GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for megabytes in (int(s) for s in args.sizes.split(",")):
        for secagg in (False, True):
            result = run_child(megabytes, secagg, args, work)
            for row in result["rounds"]:
                marks = row["marks"]
                exchanges = {name: end - begin for name, begin, end in marks[1:]}
                cells = [exchanges.get(name) for name in ("setup", "share_keys", "collect_masked_vectors", "unmask",
                                                           "train")]
                decode = row["evaluated"] - marks[-1][2]
                print(f"| {megabytes} MiB | {'on' if secagg else 'off'} | {row['round']} | "
                      + " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
                      + f" | {decode:.2f} | {row['evaluated'] - marks[0][2]:.2f} | "
                      f"{row['down'] / MB:.1f} / {row['up'] / MB:.1f} | {row['dtype']} | {row['error']:.1e} | "
                      f"{result['peak'] / 2**30:.2f} |", flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"load average {loaded:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {args.institutions} "
          f"institutions; command: python benchmarks/large_updates.py {' '.join(sys.argv[1:])}; runs: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
