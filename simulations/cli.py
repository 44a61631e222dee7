"""`fedtune-sim`: N institutions fine-tune one model with DP on this machine.

With no arguments it runs the embedded default job (all-MiniLM-L6-v2 + LoRA on BANKING77,
4 non-IID banks, epsilon 8 each); `--config FILE` reads a job file and the flags below
override single settings of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import tomli_w
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.config import ConfigError, JobConfig, load_config
from common.data import DataError, label_set, read_job_records
from common.model_files import ModelError
from common.processes import private_umask
from common.progress import ENV_VAR as PROGRESS_ENV, Follower
from server.run_folder import JOB_FILE, METRICS_FILE, SIMULATION_FILE
from simulations.summary import print_summary

def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


# flag -> dotted config key; every flag here is a plain override of the job file.
OVERRIDES = {
    "institutions": ("federation.institutions", int, "number of simulated institutions"),
    "rounds": ("federation.rounds", int, "federated rounds"),
    "strategy": ("federation.strategy", str, "fedavg, fedprox or fedadam"),
    "alpha": ("federation.alpha", float, "Dirichlet alpha of the non-IID label split"),
    "seed": ("federation.seed", int, "seed of the split and of the initial model"),
    "epsilon": ("privacy.target_epsilon", float, "epsilon the job asks of each institution"),
    "delta": ("privacy.delta", float, "delta a new simulated data set's budget takes by default"),
    "max_grad_norm": ("privacy.max_grad_norm", float, "per-record clipping bound"),
    "accountant": ("privacy.accountant", str, "rdp or prv"),
    "secure_aggregation": ("secure_aggregation.enabled", on_off, "SecAgg+: on (default) or off, to measure its cost"),
    "task": ("model.task", str, "classification or causal_lm (a decoder LLM generating the label)"),
    "lora_rank": ("model.lora_rank", int, "LoRA rank"),
    "trainable_layers": ("model.trainable_layers", int, "upper layers that get LoRA"),
    "max_length": ("model.max_length", int, "tokens kept per text"),
    "model": ("model.path", str, "local Hugging Face model directory"),
    "local_epochs": ("training.local_epochs", float, "local passes over the data per round"),
    "batch_size": ("training.batch_size", int, "a fixed expected batch per DP-SGD step for every institution"),
    "sampling_rate": ("training.sampling_rate", float, "DP-SGD sampling rate (the batch follows the size)"),
    "min_batch": ("training.min_batch", int, "fewest records a DP-SGD step expects"),
    "max_batch": ("training.max_batch", int, "most records a DP-SGD step expects"),
    "fraction_per_round": ("federation.fraction_per_round", float, "share of the institutions asked to train each round"),
    "learning_rate": ("training.learning_rate", float, "local learning rate"),
    "device": ("training.device", str, "auto, cpu, cuda or cuda:N"),
    "train": ("data.train_path", Path, "training file (CSV, TSV or JSONL)"),
    "test": ("data.test_path", Path, "held-out file the coordinator evaluates on"),
    "text_column": ("data.text_column", str, "column holding the text"),
    "label_column": ("data.label_column", str, "column holding the label"),
    "tensorboard": ("report.tensorboard", on_off, "also write TensorBoard event files into the run folder: on or off"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune-sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="job file (TOML); defaults: `fedtune-sim --print-config`")
    parser.add_argument("--out", type=Path, help="run folder (default runs/<timestamp>)")
    parser.add_argument(
        "--state-dir", type=Path,
        help="where simulated institutions keep their privacy ledgers (default <out>/institutions); "
        "reuse it to make later jobs draw on the same budgets",
    )
    parser.add_argument("--budget-epsilon", type=float, metavar="EPSILON",
                        help="each simulated institution's budget over all jobs on --state-dir "
                        "(default: the job's epsilon, for a data set not seen before)")
    parser.add_argument("--budget-delta", type=float, metavar="DELTA",
                        help="delta of that budget (default: the job's delta, for a data set not seen before)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved job as TOML and exit")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue the job in RUN_DIR from the round after its last checkpoint: the same job "
                        "id, institutions and ledgers (job flags are not allowed with it)")
    parser.add_argument("--cpus-per-institution", type=float, default=1.0, help="CPU cores per simulated institution")
    parser.add_argument("--gpus-per-institution", type=float, default=0.0, help="GPU share per simulated institution")
    parser.add_argument("--merge", action="store_true",
                        help="also write the final model with the adapter merged in (<out>/model/merged)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log lines")
    parser.add_argument("--console", action="store_true",
                        help="follow the job in a browser: a live console on 127.0.0.1, its URL (with its token) "
                        "printed before the first round; it stops when the job ends")
    parser.add_argument("--console-port", type=int, default=0, metavar="PORT", help="port of --console (default: a free one)")
    for flag, (_, kind, text) in OVERRIDES.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, help=text)
    return parser


def resolve_job(args: argparse.Namespace) -> JobConfig:
    """The job file plus overrides, with the label set read from the training file."""
    job = load_config(args.config, {key: getattr(args, flag) for flag, (key, _, _) in OVERRIDES.items()})
    if job.data.labels is None:
        job.data.labels = label_set(read_job_records(job.data.train_path, job.data))
    if job.data.test_path is None:
        raise ConfigError("data.test_path: the simulation needs a held-out file to evaluate on")
    test = read_job_records(job.data.test_path, job.data)
    if job.data.labels:
        test.label_ids(job.data.labels)
    if job.training.threads == 0:
        job.training.threads = 1
    return job


def resume_target(args: argparse.Namespace) -> tuple[JobConfig, str, Path]:
    """The job, job id and ledger folder of the run folder to resume, as its first start recorded them."""
    given = [flag for flag in ("config", "state_dir", "out", "budget_epsilon", "budget_delta", *OVERRIDES)
             if getattr(args, flag) is not None]
    if given:
        raise ConfigError(f"--resume continues the job as it was; drop --{given[0].replace('_', '-')}")
    owner_file, simulation_file = args.resume / JOB_FILE, args.resume / SIMULATION_FILE
    if not owner_file.is_file() or not simulation_file.is_file():
        raise ConfigError(f"{args.resume}: not the run folder of a fedtune-sim job (no {JOB_FILE} or {SIMULATION_FILE})")
    if (args.resume / METRICS_FILE).is_file():
        raise ConfigError(f"{args.resume}: its job has finished ({METRICS_FILE}); nothing to resume")
    owner = json.loads(owner_file.read_text(encoding="utf-8"))
    state_dir = Path(json.loads(simulation_file.read_text(encoding="utf-8"))["state_dir"])
    return JobConfig.model_validate(owner["job"]), str(owner["job_id"]), state_dir


def follow_progress(path: Path, job: JobConfig, stop: threading.Event, console: Console) -> None:
    """Show one bar per institution: round, local step and loss, from the institutions' events."""
    follower = Follower(path)
    columns = (
        TextColumn("{task.description:<16}"),
        TextColumn("round {task.fields[round]}/" + str(job.federation.rounds)),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[str, int] = {}
        while not stop.is_set():
            for event in follower.new_events():
                name = event["institution"]
                if name not in tasks:
                    tasks[name] = progress.add_task(name, total=event["steps"], round="-", loss="-")
                progress.update(
                    tasks[name], completed=event["step"], total=event["steps"], round=event["round"],
                    loss=f"{event['loss']:.3f}",
                )
            time.sleep(0.2)


def _quiet_libraries() -> None:
    """Library chatter (weight-loading bars, deprecation notices) would bury the progress display."""
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="opacus")


def main(argv: list[str] | None = None) -> int:
    private_umask()  # run folders, ledgers and feature caches (hidden states of every record): owner only
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: keep table rows on one line
    job_id = None
    try:
        if args.resume:
            job, job_id, state_dir = resume_target(args)
        else:
            job = resolve_job(args)
    except (ConfigError, DataError, ModelError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    if args.print_config:
        sys.stdout.write(tomli_w.dumps(job.to_toml_dict()))
        return 0
    from client.privacy.budget import BudgetError
    from simulations.engine import SimulationFailed, simulate  # heavy imports after validation

    if not args.verbose:
        _quiet_libraries()

    out = (args.resume or args.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        state_dir = (args.state_dir or out / "institutions").resolve()
        (out / SIMULATION_FILE).write_text(json.dumps({"state_dir": str(state_dir)}) + "\n", encoding="utf-8")
    progress_file = out / "progress.jsonl"
    progress_file.unlink(missing_ok=True)
    os.environ[PROGRESS_ENV] = str(progress_file)
    console.print(
        f"fedtune-sim: {job.federation.institutions} institutions, {job.federation.rounds} rounds, "
        f"epsilon {job.privacy.target_epsilon} (delta {job.privacy.delta:g}) each -> {out}"
    )
    watched = web = None
    if args.console:
        from server.console import serve_simulation

        watched, web = serve_simulation(out, job, args.console_port)
        print(f"fedtune-sim: console at {web.url} (127.0.0.1 only; the token in it is the key)", flush=True)
    outcome = ("interrupted", "the simulation stopped before the job ended")  # for the console
    stop = threading.Event()
    display = threading.Thread(target=follow_progress, args=(progress_file, job, stop, console), daemon=True)
    display.start()
    try:
        simulate(
            job, out, state_dir, args.cpus_per_institution,
            args.gpus_per_institution, verbose=args.verbose, budget_epsilon=args.budget_epsilon,
            budget_delta=args.budget_delta, job_id=job_id,
        )
        outcome = ("finished", "")
    except (SimulationFailed, BudgetError) as exc:
        outcome = ("failed", str(exc))
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    finally:
        stop.set()
        display.join()
        if web is not None:
            watched.finish(*outcome)
            web.stop()  # after every open page has the final state
    if args.merge:
        from common.models.export import merge_model  # loads the base model: only when asked

        console.print(f"merged model: {merge_model(out / 'model')}", highlight=False)
    print_summary(out, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
