"""Benchmark for a CUDA machine: the same DP-SGD step of SmolLM2-135M LoRA on the CPU and on the GPU
(fp32 and bf16 autocast), then a 2-institution simulated job with half a GPU each.

Prints one table (samples/s and peak memory per device and precision, bf16 with gradient
checkpointing too) and the job's wall time and accuracy. Needs the converted model
(scripts/setup_smollm2.py); BENCHMARKS.md has an H200's figures and how they were taken. Run by hand:

    .venv/bin/python benchmarks/gpu.py [--batch 64] [--steps 5] [--trainable-layers 30] [--skip-job]

`--compare-checkpointing DEVICE` (cpu too) prints only the same step with and without
`training.gradient_checkpointing`, each in a fresh process (the CPU's peak memory is the process's).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def dp_step_rate(device_name: str, precision: str, checkpointing: bool, args) -> dict:
    import torch

    from client.trainer import train_dp
    from common.accounting import NoisePlan, accountant_state, restore_accountant
    from common.config import DataConfig, ModelConfig
    from common.data import read_job_records
    from common.model_files import smollm2_path
    from common.models import decoder

    device = torch.device(device_name)
    config = ModelConfig(task="causal_lm", path=str(smollm2_path()), max_length=64,
                         trainable_layers=args.trainable_layers, lora_rank=16)
    records = read_job_records(Path("data/banking77_llm/train.csv"), DataConfig())
    model = decoder.build_model(config, [], device)
    features = decoder.encode(model, config, records, Path(args.cache))
    upper = decoder.UpperStack(model, config)
    rate = 1 / -(-len(features) // args.batch)
    plan = NoisePlan(noise_multiplier=1.0, sample_rate=rate, batch_size=args.batch, steps_per_round=args.steps + 1,
                     rounds=1)
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(step, total, loss):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_dp(upper, features, torch.zeros(len(features), dtype=torch.long), plan, steps=args.steps + 1,
             max_grad_norm=1.0, learning_rate=1e-3, adapter_learning_rate=1e-4,
             accountant=restore_accountant(accountant_state([], "prv"), "prv"), on_step=tick,
             grad_sample_mode=args.mode, autocast="bf16" if precision == "bf16" else "off",
             gradient_checkpointing=checkpointing)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"device": device_name, "precision": precision, "checkpointing": checkpointing,
            # Poisson batches: their expected size, not --batch (660 records at --batch 64 sample 60 a step).
            "step_s": statistics.median(times[1:]), "samples_per_s": len(features) * rate / statistics.median(times[1:]),
            "peak_bytes": peak}


def in_fresh_process(device: str, precision: str, checkpointing: bool, args) -> dict:
    """One measurement in its own process (peak memory is its own); a failure ends it with its last line."""
    command = [sys.executable, __file__, "--one", device, precision, str(int(checkpointing)), "--cache", args.cache,
               *sys.argv[1:]]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"benchmarks/gpu.py: {device} {precision} failed: {last}")
    return json.loads(done.stdout.split("\n")[-2])


def compare_checkpointing(device: str, args) -> None:
    import os

    loaded = os.getloadavg()[0]
    rows = [in_fresh_process(device, "fp32", checkpointing, args) for checkpointing in (False, True)]
    print(f"SmolLM2-135M LoRA r=16, top {args.trainable_layers} layers, DP-SGD ({args.mode}), batch {args.batch}, "
          f"{device}; median of {args.steps} steps after the first; load average {loaded:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end")
    print("| gradient checkpointing | s per step | samples/s | peak memory |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {'on' if row['checkpointing'] else 'off'} | {row['step_s']:.2f} | {row['samples_per_s']:.1f} | "
              f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    print(f"checkpointing / plain: time {rows[1]['step_s'] / rows[0]['step_s']:.2f}x, "
          f"peak memory {rows[1]['peak_bytes'] / rows[0]['peak_bytes']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trainable-layers", type=int, default=30, help="30: the whole of SmolLM2 trains")
    parser.add_argument("--mode", choices=["hooks", "ghost"], default="ghost")
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--compare-checkpointing", metavar="DEVICE")
    parser.add_argument("--one", nargs=3, metavar=("DEVICE", "PRECISION", "CHECKPOINTING"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=tempfile.mkdtemp(prefix="fedtune-gpu-bench-"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(dp_step_rate(args.one[0], args.one[1], args.one[2] == "1", args)))
        return 0
    if args.compare_checkpointing:
        compare_checkpointing(args.compare_checkpointing, args)
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here")
    print(f"GPU: {torch.cuda.get_device_name(0)}; SmolLM2-135M LoRA r=16, top {args.trainable_layers} layers, "
          f"DP-SGD ({args.mode}), batch {args.batch}, median of {args.steps} steps after the first")
    print("| device | precision | gradient checkpointing | s per step | samples/s | x CPU | peak memory |")
    print("|---|---|---|---:|---:|---:|---:|", flush=True)
    cpu = None
    # The CPU first: every GPU row is quoted against it, and printed as soon as measured.
    for setting in (("cpu", "fp32", False), ("cuda:0", "fp32", False), ("cuda:0", "bf16", False),
                    ("cuda:0", "bf16", True)):
        row = in_fresh_process(*setting, args)
        cpu = cpu or row
        print(f"| {row['device']} | {row['precision']} | {'on' if row['checkpointing'] else 'off'} | "
              f"{row['step_s']:.3f} | {row['samples_per_s']:.1f} | {row['samples_per_s'] / cpu['samples_per_s']:.1f} | "
              f"{row['peak_bytes'] / 2**30:.2f} GiB |", flush=True)
    if not args.skip_job:
        out = Path(tempfile.mkdtemp(prefix="fedtune-gpu-job-")) / "run"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "simulations.cli", "--config", "data/banking77_llm/demo.toml",
                        "--institutions", "2", "--device", "cuda", "--gpus-per-institution", "0.5",
                        "--out", str(out)], check=True)
        last = json.loads((out / "metrics.json").read_text())["rounds"][-1]
        print(f"2-institution job, 0.5 GPU each: {time.perf_counter() - started:.0f} s, "
              f"accuracy {last['accuracy']:.3f}, perplexity {last.get('perplexity', float('nan')):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
