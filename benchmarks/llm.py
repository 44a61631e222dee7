"""Benchmark: one DP-SGD step of SmolLM2-135M LoRA, against the same step without DP, at the same batch.

Prints one table: seconds per step (median of the timed steps), the ratio to the non-DP step, and
the peak resident memory of the process that ran it. Each mode runs in its own process (a clean
peak) on the same cached features of the same BANKING77 records, one after the other in one run.
Modes: no DP (plain backward), Opacus hooks (per-record gradients), Opacus ghost clipping.
Needs the converted model (`make demo-llm` or scripts/setup_smollm2.py). Run by hand; record the
output, the machine and the command in BENCHMARKS.md.

    .venv/bin/python benchmarks/llm.py [--batch 64] [--steps 3] [--trainable-layers 2] [--device cpu]

`--central JOB.toml` instead fine-tunes that job's model centrally, without DP, on the union of its
training file (the job's LoRA placement, Adam, `--epochs` passes at `--batch`) and prints the test
accuracy and perplexity: the baseline a DP federated run of the job compares with.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("none", "hooks", "ghost")


def setup(args):
    import torch

    from common.config import BANKING77, DataConfig, ModelConfig
    from common.data import read_job_records
    from common.model_files import smollm2_path
    from common.models import decoder

    config = ModelConfig(task="causal_lm", path=str(args.model or smollm2_path()), max_length=args.max_length,
                         trainable_layers=args.trainable_layers, lora_rank=args.rank)
    records = read_job_records(BANKING77 / "train.csv", DataConfig()).subset(range(args.records))
    device = torch.device(args.device)
    model = decoder.build_model(config, [], device)
    started = time.perf_counter()
    features = decoder.encode(model, config, records, Path(args.cache))
    return config, model, features, time.perf_counter() - started, device


def run_mode(args) -> dict:
    import torch

    from client.trainer import train_dp
    from common.accounting import NoisePlan, accountant_state, restore_accountant
    from common.models import decoder

    config, model, features, _, device = setup(args)
    upper = decoder.UpperStack(model, config)
    rate = args.batch / len(features)
    times: list[float] = []
    if args.mode == "none":
        optimizer = torch.optim.Adam([p for p in upper.parameters() if p.requires_grad], lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        for _ in range(args.steps + 1):
            rows = torch.nonzero(torch.rand(len(features), generator=generator) < rate)[:, 0]  # Poisson, as DP
            started = time.perf_counter()
            optimizer.zero_grad()
            upper(*features.batch(rows, device)).mean().backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
    else:
        plan = NoisePlan(noise_multiplier=1.0, sample_rate=1 / math.ceil(len(features) / args.batch),
                         batch_size=args.batch, steps_per_round=args.steps + 1, rounds=1)
        last = [time.perf_counter()]

        def tick(step, total, loss):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        train_dp(upper, features, torch.zeros(len(features), dtype=torch.long), plan, steps=args.steps + 1,
                 max_grad_norm=1.0, learning_rate=1e-3, adapter_learning_rate=1e-4,
                 accountant=restore_accountant(accountant_state([], "prv"), "prv"), on_step=tick,
                 grad_sample_mode=args.mode, physical_batch=args.physical_batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    return {"mode": args.mode, "seconds": statistics.median(times[1:]), "peak_bytes": peak}


def central(args) -> int:
    import torch

    from common.config import load_config
    from common.data import read_job_records
    from common.model_files import default_cache_dir
    from common.models import decoder

    job = load_config(Path(args.central))
    device = torch.device(args.device)
    model = decoder.build_model(job.model, [], device, seed=job.federation.seed)
    train = read_job_records(job.data.train_path, job.data)
    test = read_job_records(job.data.test_path, job.data)
    started = time.perf_counter()
    features = decoder.encode(model, job.model, train, default_cache_dir())
    test_features = decoder.encode(model, job.model, test, default_cache_dir())
    upper = decoder.UpperStack(model, job.model)
    optimizer = torch.optim.Adam([p for p in upper.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        for rows in torch.randperm(len(features), generator=generator).split(args.batch):
            optimizer.zero_grad()
            upper(*features.batch(rows, device)).mean().backward()
            optimizer.step()
        result = decoder.evaluate(upper, test_features, None, test, job.data.labels)
        print(f"epoch {epoch + 1}: accuracy {result['accuracy']:.4f}, perplexity {result['perplexity']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="converted SmolLM2 folder (default: fedtune's cache)")
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--physical-batch", type=int)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trainable-layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--central", metavar="JOB", help="central non-DP baseline of this job file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.central:
        return central(args)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    args.cache = args.cache or tempfile.mkdtemp(prefix="fedtune-llm-bench-")
    _, model, features, encode_seconds, _ = setup(args)
    tokens = int(features.lengths.sum())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    rows = []
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--cache", args.cache, *sys.argv[1:]]
        out = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{args.threads}, device {args.device}")
    print(f"SmolLM2-135M-Instruct, LoRA r={args.rank} on all projections of the top {args.trainable_layers} layers "
          f"({trainable:,} trainable), {args.records} BANKING77 records as chat prompts + label, "
          f"{tokens:,} tokens (max_length {args.max_length})")
    print(f"frozen part, once: {encode_seconds:.1f} s ({tokens / encode_seconds:.0f} tokens/s)")
    print(f"| mode | s/step at batch {args.batch} | x no-DP | peak memory |")
    print("|---|---:|---:|---:|")
    base = rows[0]["seconds"]
    for row in rows:
        print(f"| {row['mode']} | {row['seconds']:.3f} | {row['seconds'] / base:.2f} | "
              f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
