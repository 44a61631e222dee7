"""End-of-run tables, printed from the run folder's metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from server.report import cell, institution_dp_line


def print_summary(out: Path, console: Console) -> None:
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    budgets = {inst["name"]: inst["budget_epsilon"] for inst in metrics["institutions"]}
    names = [inst["name"] for inst in metrics["institutions"]]

    rounds = Table(title="Global model per round (coordinator's test split)")
    for column in ("round", "accuracy", "loss", *[f"ε {n}" for n in names]):
        rounds.add_column(column, justify="right")
    for r in metrics["rounds"]:
        spent = [
            f"{r['epsilon'][n]:.2f}/{budgets[n]:g}" if n in r["epsilon"]
            else "declined" if n in r["declined"] else "dropped" if n in r["dropped"] else "-"
            for n in names
        ]
        rounds.add_row(str(r["round"]), f"{r['accuracy']:.4f}", f"{r['loss']:.3f}", *spent)
    console.print(rounds)

    institutions = Table(title="Institutions (whole job)")
    for column in ("institution", "records (rounded)", "ε granted/job", "ε data set/budget", "delta", "noise", "sample rate",
                   "clip", "steps", "bytes sent", "bytes recv."):
        institutions.add_column(column, justify="right")
    for inst in metrics["institutions"]:
        institutions.add_row(
            inst["name"], cell(inst["examples"]), f"{cell(inst['granted_epsilon'], '.3f')}/{inst['epsilon']:.3f}",
            f"{cell(inst['dataset_epsilon'], '.3f')}/{cell(inst['budget_epsilon'], 'g')}",
            cell(inst["delta"], "g"), cell(inst["noise_multiplier"], ".4f"), cell(inst["sample_rate"], ".4f"),
            cell(inst["max_grad_norm"], "g"), str(inst["steps"]), f"{inst['bytes_up']:,}", f"{inst['bytes_down']:,}",
        )
    console.print(institutions)
    accountants = ", ".join(sorted({inst["accountant"] for inst in metrics["institutions"]} - {None}))
    console.print(
        f"accountant: {accountants or '-'} over each data set's whole released history; "
        f"secure aggregation {'on (SecAgg+)' if metrics['secure_aggregation'] else 'off'}; "
        f"{institution_dp_line(metrics['institution_dp'])}\n"
        f"wall time {metrics['wall_seconds']:.1f} s; run folder {out}"
    )
