"""`fedtune-server`: run the consortium's coordinator.

The coordinator operator creates the consortium CA and the coordinator's TLS certificate,
starts the coordinator (a Flower SuperLink with TLS and institution authentication), admits each
institution by its public key, tells institutions the hash of the app bundle to approve, and
submits jobs. Institutions never send records, only updates.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import get_args

from common.config import DEFAULT_PACE, ConfigError, Pace
from common.data import DataError
from common.messages import describe_error
from common.processes import (
    FlowerProcess,
    ProcessError,
    SettingError,
    address_arg,
    dial_host,
    on_stop_signals,
    private_dir,
    private_umask,
    require_loopback,
    split_address,
)
from server import pki
from server.fleet_events import GRPC_LOG_ENV
from server.coordinator import (
    COMPLETED,
    Coordinator,
    CoordinatorError,
    TlsFiles,
    bundle_hash,
    outside_app_folder,
    superlink_command,
    validate_job,
)

DEFAULT_STATE = Path("~/.fedtune/coordinator").expanduser()
INSECURE_WARNING = (
    "WARNING: --insecure: TLS is off. Updates cross the network unencrypted and institutions are NOT "
    "authenticated: any process that reaches the Fleet port can join a job. Use only for a trial on one machine."
)


def say(message: str) -> None:
    print(f"fedtune-server: {message}", flush=True)


def cmd_ca_init(args: argparse.Namespace) -> int:
    issued = pki.init_ca(args.dir, args.name, args.days)
    say(f"CA certificate {issued.cert} (give this file to every institution)")
    say(f"CA private key {issued.key} (mode 0600; keep it offline, it signs the coordinator's certificates)")
    return 0


def cmd_cert_issue(args: argparse.Namespace) -> int:
    hosts, ips = args.host, args.ip
    if not hosts and not ips:
        hosts, ips = ["localhost"], ["127.0.0.1"]
    issued = pki.issue_server_cert(args.dir, args.out or args.dir, hosts, ips, args.days)
    until = datetime.now(timezone.utc) + timedelta(days=args.days)
    say(f"coordinator certificate {issued.cert}, key {issued.key} (mode 0600)")
    say(f"valid for {', '.join(pki.subject_alt_names(issued.cert))} until about {until:%Y-%m-%d}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    # Whoever reaches the control API can admit a node or run ServerApp code as this user.
    require_loopback(args.host, "--host", "the control API (admit institutions, submit jobs)")
    coordinator = Coordinator(outside_app_folder(args.state_dir, "state folder"))
    private_dir(coordinator.state)
    tls = None
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        tls = TlsFiles.in_folder(args.certs or coordinator.state)
        missing = [str(path) for path in (tls.ca, tls.cert, tls.key) if not path.is_file()]
        if missing:
            raise pki.PkiError(
                f"no TLS files ({', '.join(missing)}); create them with `fedtune-server ca init` and "
                "`fedtune-server cert issue`, or pass --insecure for a local trial"
            )
        expires = pki.check_server_files(tls.ca, tls.cert, tls.key)
        if dial_host(args.host) not in pki.subject_alt_names(tls.cert):  # the `flwr` CLI and the ServerApp dial it
            raise pki.PkiError(f"{tls.cert}: not valid for {dial_host(args.host)}, where the control API listens; "
                               f"issue it with `--ip {dial_host(args.host)}` besides the names institutions dial")
        if expires - datetime.now(timezone.utc) < timedelta(days=30):
            say(f"warning: {tls.cert} expires on {expires:%Y-%m-%d}; issue a new one soon")
    fleet_host, fleet_port = split_address(args.fleet_address)
    control = coordinator.write_connection(args.host, args.port, tls.ca if tls else None)
    stopping: list[int] = []
    current: list[FlowerProcess] = []

    def stop(signum: int) -> None:
        stopping.append(signum)
        if current:
            current[-1].signal_group(signal.SIGTERM)

    crashes: list[float] = []
    tried: set[str] = set()  # runs this supervisor has resumed (or named, with --no-resume): each once
    with on_stop_signals(stop):
        # Supervised: a SuperLink that dies is started again on the same state database, and every job its run
        # folders say is unfinished is resumed from its last checkpoint (unless --no-resume), at each start and
        # while the SuperLink runs (a ServerApp can fail alone).
        while not stopping:
            process = FlowerProcess(
                superlink_command(coordinator.state, args.host, args.port, args.fleet_address, tls, args.pace),
                dict(coordinator.env(), **GRPC_LOG_ENV), cwd=coordinator.state, name="flower-superlink",
            )
            current.append(process)
            try:
                process.wait_for_port(dial_host(args.host), args.port, timeout=60)
                process.wait_for_port(dial_host(fleet_host), fleet_port, timeout=60)
                say(f"ready: institutions connect to {args.fleet_address}; control API at {control}; "
                    f"state in {coordinator.state}")
                coordinator.interrupted_by_restart()
                code = _supervise(process, coordinator, not args.no_resume, tried, stopping)
            except ProcessError as exc:
                if stopping:
                    break
                code = str(exc)
            finally:
                process.stop()
            if stopping:
                break
            crashes = [at for at in crashes if time.monotonic() - at < RESTART_WINDOW] + [time.monotonic()]
            if len(crashes) > MAX_RESTARTS:
                raise ProcessError(f"flower-superlink exited ({code}) {len(crashes)} times within "
                                   f"{RESTART_WINDOW} s; not restarting it again")
            delay = min(2 ** (len(crashes) - 1), 30)
            say(f"flower-superlink exited ({code}); restarting it in {delay} s on {coordinator.state / 'superlink.db'}")
            time.sleep(delay)
    say("stopped")
    return 0


MAX_RESTARTS = 5  # SuperLink restarts tolerated within RESTART_WINDOW seconds
RESTART_WINDOW = 300
RECOVERY_POLL = 30.0  # seconds between looks for a job whose ServerApp failed while the SuperLink runs


def _supervise(process: FlowerProcess, coordinator: Coordinator, resume: bool, tried: set[str],
               stopping: list[int]) -> int:
    """Until the SuperLink exits (its exit code) or a stop signal: resume the unfinished jobs now and every
    RECOVERY_POLL seconds."""
    while True:
        if not stopping:
            _recover_jobs(coordinator, resume, tried)
        try:
            return process.wait(RECOVERY_POLL)
        except subprocess.TimeoutExpired:
            continue


def _recover_jobs(coordinator: Coordinator, resume: bool, tried: set[str]) -> None:
    """Resume, once each, the jobs whose run folders say they are unfinished and whose run Flower ended
    (server/coordinator.py `to_resume`: interrupted by a restart, or failed after making progress)."""
    try:
        runs = [run_id for run_id in coordinator.to_resume() if run_id not in tried]
    except CoordinatorError as exc:  # the SuperLink is going down or busy: the next look tries again
        say(f"could not list the runs to resume: {exc}")
        return
    for run_id in runs:
        tried.add(run_id)
        if not resume:
            say(f"run {run_id} was interrupted; resume it with `fedtune-server resume {run_id}`")
            continue
        try:
            new = coordinator.resume(run_id)
        except CoordinatorError as exc:
            say(f"run {run_id} was interrupted and could not be resumed: {exc}")
            continue
        say(f"run {run_id} was interrupted; resumed as run {new} from its last checkpoint")


def cmd_admit(args: argparse.Namespace) -> int:
    node_id = Coordinator(args.state_dir).admit(args.public_key, args.name)
    say(f"admitted {args.name} as node {node_id}")
    return 0


def cmd_institutions(args: argparse.Namespace) -> int:
    rows = Coordinator(args.state_dir).institutions()
    if not rows:
        say("no institutions admitted yet")
        return 0
    print(f"{'NAME':<20} {'NODE ID':<22} {'STATUS':<13} SINCE")
    for row in rows:
        print(f"{row['name']:<20} {row['node_id']:<22} {row['status']:<13} {row['since']}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    name, node_id = Coordinator(args.state_dir).revoke(args.institution)
    say(f"revoked {name} (node {node_id}); its SuperNode is refused from its next request on")
    say("a revoked key cannot be admitted again: the institution must make a new one with `fedtune-client keygen`")
    return 0


def cmd_bundle(_args: argparse.Namespace) -> int:
    print(bundle_hash())
    return 0


def _failure(run: dict) -> str:
    """Flower's reason a run failed (for fedtune's jobs it carries an institution's reason), or ''."""
    details = run.get("status-details") or ""
    return "" if details in ("", "N/A") or run["status"] == COMPLETED else describe_error(details)


def cmd_submit(args: argparse.Namespace) -> int:
    job = validate_job(args.job)
    if args.pace:
        job.federation.pace = args.pace
    out = outside_app_folder(args.out, "run folder")
    if out.exists() and any(out.iterdir()):
        raise CoordinatorError(f"{out}: not empty; give each run a new folder")
    coordinator = Coordinator(args.state_dir)
    run_id = coordinator.submit(job, out)
    bundle = coordinator.runs(run_id)[0]["fab-hash"]
    say(f"submitted run {run_id}: {job.federation.institutions} institutions, {job.federation.rounds} rounds -> {out}")
    say(f"app bundle sha256:{bundle} (each institution must have approved it)")
    if args.detach:
        say(f"follow it with `fedtune-server follow {run_id}` or `fedtune-server console` (a browser)")
        return 0
    return _follow(coordinator, run_id, out, args.quiet)


def cmd_follow(args: argparse.Namespace) -> int:
    coordinator = Coordinator(args.state_dir)
    runs = coordinator.runs(args.run_id)
    if not runs:
        raise CoordinatorError(f"no run {args.run_id} (see `fedtune-server status`)")
    out = Path(runs[0]["out"]) if runs[0]["out"] else None
    say(f"following run {args.run_id} ({runs[0]['status']}){' -> ' + str(out) if out else ''}")
    return _follow(coordinator, args.run_id, out, args.quiet)


def cmd_console(args: argparse.Namespace) -> int:
    from server.console import Console, ConsoleServer, CoordinatorJobs

    coordinator = Coordinator(args.state_dir)
    if not coordinator.flwr_home.is_dir():
        raise CoordinatorError(f"{coordinator.state}: no coordinator here (start one with `fedtune-server start`)")
    jobs = CoordinatorJobs(coordinator.state)
    server = ConsoleServer(Console(jobs.snapshot), args.port)
    jobs.start()
    say(f"console at {server.url} (127.0.0.1 only; the token in it is the key; Ctrl-C stops it)")
    try:
        server.run()
    finally:
        jobs.stop()
    say("console stopped")
    return 0


def _follow(coordinator: Coordinator, run_id: str, out: Path | None, quiet: bool) -> int:
    """Stream the run's log until it ends; 0 if it completed."""
    try:
        run = coordinator.follow(run_id, show_logs=not quiet)
    except KeyboardInterrupt:
        say(f"stopped following; run {run_id} goes on (`fedtune-server follow {run_id}`)")
        return 130
    if run["status"] != COMPLETED:
        details = _failure(run)
        say(f"error: run {run_id} ended {run['status']}{': ' + details if details else ''}"
            f" (see `flwr log {run_id}` with FLWR_HOME={coordinator.flwr_home})")
        return 1
    summary = ""
    metrics_file = out / "metrics.json" if out else None
    if metrics_file and metrics_file.is_file():
        last = json.loads(metrics_file.read_text())["rounds"][-1]
        summary = f"; accuracy {last['accuracy']:.3f} after round {last['round']}"
    say(f"run {run_id} {run['status']}{summary}; results in {out}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    coordinator = Coordinator(args.state_dir)
    runs = coordinator.runs(args.run_id)
    if not runs:
        say("no runs yet")
        return 0
    flower = {str(run["run-id"]): run for run in runs}
    print(f"{'RUN ID':<22} {'STATUS':<20} {'JOB':<18} {'STATE':<18} {'CHECKPOINT':>10} {'ELAPSED':>8}  "
          f"{'BUNDLE':<12}  RUN FOLDER")
    for run in runs:
        job = coordinator.job_state(str(run["run-id"]), flower)
        saved = f"{job['last_round']}/{job['rounds']}" if job["rounds"] else "-"
        state = job["state"] + (f" as {job['resumed_by']}" if job["resumed_by"] else "")
        print(f"{run['run-id']:<22} {run['status']:<20} {job['job_id'] or '-':<18} {state:<18} {saved:>10} "
              f"{run['elapsed']:>7.0f}s  {run['fab-hash'][:12]:<12}  {run['out'] or '-'}")
    for run in runs:
        if details := _failure(run):
            print(f"run {run['run-id']} {run['status']}: {details}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    coordinator = Coordinator(args.state_dir)
    run_id = coordinator.resume(args.run_id)
    state = coordinator.job_state(run_id)
    out = Path(coordinator.runs(run_id)[0]["out"])
    say(f"resumed job {state['job_id']} of run {args.run_id} as run {run_id}, from the checkpoint of round "
        f"{coordinator.job_state(args.run_id)['last_round']} -> {out}")
    if args.detach:
        return 0
    return _follow(coordinator, run_id, out, args.quiet)


def cmd_export(args: argparse.Namespace) -> int:
    to = Coordinator(args.state_dir).export(args.run_id, args.to)
    say(f"copied run {args.run_id} to {to}")
    if args.merge:
        from common.models.export import merge_model  # loads the base model: only when asked

        say(f"merged model: {merge_model(Path(to) / 'model')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune-server", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"coordinator state folder (default {DEFAULT_STATE})")

    ca = commands.add_parser("ca", help="the consortium's certificate authority")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    init = ca_commands.add_parser("init", help="create the CA key (ca.key, 0600) and certificate (ca.pem) in DIR")
    init.add_argument("--dir", type=Path, required=True, metavar="DIR", help="folder for ca.key and ca.pem")
    init.add_argument("--name", default="fedtune consortium CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.set_defaults(run=cmd_ca_init)

    cert = commands.add_parser("cert", help="the coordinator's TLS certificate")
    cert_commands = cert.add_subparsers(dest="cert_command", required=True, metavar="COMMAND")
    issue = cert_commands.add_parser("issue", help="sign a TLS certificate (server.pem, server.key) with the CA in DIR")
    issue.add_argument("--dir", type=Path, required=True, metavar="DIR", help="folder holding ca.key and ca.pem")
    issue.add_argument("--out", type=Path, metavar="DIR", help="folder for server.pem and server.key (default: --dir)")
    issue.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="DNS name institutions dial (repeatable; default localhost when no --host/--ip)")
    issue.add_argument("--ip", action="append", default=[], metavar="IP",
                       help="IP address institutions dial (repeatable; default 127.0.0.1 when no --host/--ip)")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.set_defaults(run=cmd_cert_issue)

    start = commands.add_parser("start", parents=[state], help="run the coordinator (until Ctrl-C)")
    start.add_argument("--certs", type=Path, metavar="DIR",
                       help="folder with ca.pem, server.pem and server.key (default: the state folder)")
    start.add_argument("--host", default="127.0.0.1",
                       help="loopback address of the control API (admin, jobs) (default 127.0.0.1; from "
                       "elsewhere, use an SSH tunnel)")
    start.add_argument("--port", type=int, default=9093, help="port of the control API (default 9093)")
    start.add_argument("--fleet-address", default="127.0.0.1:9092", type=address_arg, metavar="HOST:PORT",
                       help="HOST:PORT institutions connect to (default 127.0.0.1:9092; 0.0.0.0:9092 for all interfaces)")
    start.add_argument("--no-resume", action="store_true",
                       help="leave unfinished jobs (interrupted by a restart, or whose ServerApp failed) for `fedtune-server "
                       "resume` instead of resuming them")
    start.add_argument("--insecure", action="store_true",
                       help="run without TLS and without institution authentication (local trials only)")
    start.add_argument("--pace", choices=get_args(Pace), default=DEFAULT_PACE,
                       help="how often the SuperLink sweeps expired task claims and reads a followed run's log "
                       f"(server/link_chores.py), or 'flower': as Flower 1.39 does (default {DEFAULT_PACE})")
    start.set_defaults(run=cmd_start)

    admit = commands.add_parser("admit", parents=[state], help="admit an institution by its public key")
    admit.add_argument("public_key", type=Path, metavar="PUBKEY_FILE", help="the node.pub the institution sent")
    admit.add_argument("--name", required=True, help="the institution's name")
    admit.set_defaults(run=cmd_admit)

    institutions = commands.add_parser("institutions", parents=[state], help="list admitted institutions")
    institutions.set_defaults(run=cmd_institutions)

    revoke = commands.add_parser("revoke", parents=[state], help="revoke an institution (it is cut off at once)")
    revoke.add_argument("institution", metavar="NAME_OR_ID", help="institution name or node id")
    revoke.set_defaults(run=cmd_revoke)

    bundle = commands.add_parser("bundle", help="print the SHA-256 of the app bundle `submit` would ship now "
                                 "(institutions approve it with `fedtune-client approve HASH`)")
    bundle.set_defaults(run=cmd_bundle)

    submit = commands.add_parser("submit", parents=[state], help="check a job, run it and wait for the result")
    submit.add_argument("job", type=Path, metavar="JOB.toml", help="job file (see `fedtune-sim --print-config`)")
    submit.add_argument("--out", type=Path, required=True, metavar="DIR", help="new run folder on this machine")
    submit.add_argument("--detach", action="store_true", help="return once the run is submitted")
    submit.add_argument("--quiet", action="store_true", help="do not stream the coordinator's log")
    submit.add_argument("--pace", choices=get_args(Pace),
                        help="how the coordinator waits for replies (default: the job's federation.pace)")
    submit.set_defaults(run=cmd_submit)

    follow = commands.add_parser("follow", parents=[state], help="stream a run's log until it ends (e.g. after --detach)")
    follow.add_argument("run_id", metavar="RUN_ID")
    follow.add_argument("--quiet", action="store_true", help="do not stream the coordinator's log, only wait")
    follow.set_defaults(run=cmd_follow)

    console = commands.add_parser("console", parents=[state],
                                  help="a live web console of the jobs, on 127.0.0.1 (read-only; until Ctrl-C)")
    console.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    console.set_defaults(run=cmd_console)

    status = commands.add_parser("status", parents=[state], help="show runs and their status")
    status.add_argument("run_id", nargs="?", metavar="RUN_ID", help="one run (default: all)")
    status.set_defaults(run=cmd_status)

    resume = commands.add_parser("resume", parents=[state],
                                 help="continue an interrupted job from its last checkpoint, as the same job")
    resume.add_argument("run_id", metavar="RUN_ID", help="the interrupted run")
    resume.add_argument("--detach", action="store_true", help="return once the job is resubmitted")
    resume.add_argument("--quiet", action="store_true", help="do not stream the coordinator's log")
    resume.set_defaults(run=cmd_resume)

    export = commands.add_parser("export", parents=[state], help="copy a finished run's folder")
    export.add_argument("run_id", metavar="RUN_ID")
    export.add_argument("--to", type=Path, required=True, metavar="DIR", help="new folder to copy the run folder to")
    export.add_argument("--merge", action="store_true",
                        help="also write the model with its adapter merged in (DIR/model/merged; loads the base model)")
    export.set_defaults(run=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    private_umask()  # before anything is written: state, runs, secrets are the operator's alone
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataError, pki.PkiError, SettingError) as exc:
        print(f"fedtune-server: error: {exc}", file=sys.stderr)
        return 2
    except (CoordinatorError, ProcessError) as exc:
        print(f"fedtune-server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
