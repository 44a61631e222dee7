"""`fedtune-client`: run an institution's node in a fedtune consortium.

The institution operator makes a node key and sends its public half to the coordinator, checks
the local data file against the job, approves the app bundle (the code) the coordinator will
ship, and starts the node. Records never leave this machine: the node trains on them locally
and sends only DP-noised model updates over TLS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import get_args

from client import approval
from client.approval import ApprovalError
from client.daemon import NodeError, NodeSettings, Supervisor
from client.keys import NodeKeyError, check_private_key, generate
from client.privacy.budget import BudgetError, resolve_dataset, set_budget
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger, budget_summary
from common.config import DEFAULT_PACE, ConfigError, Pace, load_config
from common.data import DataError, file_fingerprint, read_records
from common.model_files import model_digest, packaged_model_path
from common.processes import ProcessError, SettingError, address_arg, private_dir, private_umask, require_loopback

DEFAULT_STATE = Path("~/.fedtune/institution").expanduser()
INSECURE_WARNING = (
    "WARNING: --insecure: TLS is off. Model updates cross the network unencrypted and the coordinator is "
    "not authenticated. Use only for a trial on one machine."
)
ANY_BUNDLE_WARNING = (
    "WARNING: --allow-any-bundle: this node runs whatever code the coordinator ships, next to your data, "
    "without your approval. Use only while developing fedtune itself."
)


def say(message: str) -> None:
    print(f"fedtune-client: {message}", flush=True)


def cmd_keygen(args: argparse.Namespace) -> int:
    keys = generate(args.out, comment=args.comment or "")
    say(f"private key {keys.private} (mode 0600; never share it)")
    say(f"public key {keys.public}; send this line to the coordinator operator:")
    print(keys.public_line)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    job = load_config(args.job)
    data = job.data
    if data.labels is None:
        raise ConfigError(f"{args.job}: data.labels: the job file must list the job's labels")
    records = read_records(args.data_file, data.text_column, data.label_column)
    records.label_ids(data.labels)
    counts = Counter(records.labels)
    absent = [label for label in data.labels if label not in counts]
    say(f"ok: {args.data_file}: {len(records)} records, {len(counts)} of the job's {len(data.labels)} labels "
        f"(columns {data.text_column!r} and {data.label_column!r}); nothing was sent")
    if absent:
        say(f"note: no records for {len(absent)} label(s), e.g. {absent[0]!r}; that is allowed")
    return 0


def check_device(device: str) -> None:
    """Refuse at start, in one line, a device this machine lacks (not at the first round)."""
    if device == "cpu":
        return
    from common.model_files import ModelError
    from common.models.device import pick_device  # torch: only to check a device

    try:
        pick_device(device)
    except ModelError as exc:
        raise SettingError(f"--device: {exc}") from None


def cmd_start(args: argparse.Namespace) -> int:
    # The node's local app API hands out the coordinator's messages and takes the node's replies.
    require_loopback(args.host, "--host", "the node's local app API")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    else:
        check_private_key(args.private_key)
    state_dir = private_dir(args.state_dir.resolve())
    if args.allow_any_bundle:
        print(ANY_BUNDLE_WARNING, file=sys.stderr, flush=True)
    else:
        path = approval.approvals_file(state_dir)
        if approved := approval.load(path):
            say(f"{len(approved)} app bundle(s) approved in {path}; jobs shipping any other bundle are refused")
        else:
            say("no app bundle approved yet: every job is refused until you run `fedtune-client approve HASH`")
    dataset = register(args, state_dir, "fedtune-client start")
    model_dir = (args.model or Path(packaged_model_path())).resolve()
    try:
        model_sha256 = model_digest(model_dir)
    except FileNotFoundError:
        raise BudgetError(f"--model {model_dir}: no such model folder") from None
    say(f"model pinned: {model_dir} (sha256 {model_sha256}); jobs naming any other model are refused")
    check_device(args.device)
    settings = NodeSettings(
        superlink=args.superlink, data=args.data, name=args.name, state_dir=state_dir,
        root_certificates=None if args.insecure else args.root_certificates,
        private_key=None if args.insecure else args.private_key, dataset_id=dataset.id, model_dir=model_dir,
        model_sha256=model_sha256, device=args.device, host=args.host, port=args.port,
        allow_any_bundle=args.allow_any_bundle, pace=args.pace,
    )
    Supervisor(settings, say).run()
    say("stopped")
    return 0


def register(args: argparse.Namespace, state_dir: Path, command: str):
    """The data set of `--data` under its id, with the operator's budget; BudgetError if it has none."""
    ledger = PrivacyLedger(state_dir / LEDGER_FILE)
    sha256 = file_fingerprint(args.data)
    dataset_id = resolve_dataset(ledger, args.data, sha256, args.dataset_id)
    known = ledger.dataset(dataset_id)
    dataset = set_budget(ledger, dataset_id, args.data, sha256, epsilon_budget=args.budget_epsilon,
                         delta=args.budget_delta, accountant=args.accountant, force=args.force_budget_change,
                         changed_by=None)
    if known is not None and known.sha256 != sha256:
        say(f"note: {args.data} changed since data set {dataset_id!r} last saw it; everything it spent stays spent")
    spent = ledger.spent(dataset_id)
    budget = dataset.budget
    say(f"data set {dataset_id!r} ({args.data}): budget epsilon {budget.epsilon:g} at delta {budget.delta:g} "
        f"({budget.accountant} accountant), spent {spent:.4f}; {command} recorded it in {ledger.path}")
    return dataset


def cmd_budget(args: argparse.Namespace) -> int:
    path = args.state_dir.expanduser().resolve() / LEDGER_FILE
    rows = budget_summary(PrivacyLedger(path)) if path.is_file() else []
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    say(f"privacy ledger {path}" + ("" if path.is_file() else ": none yet (no budget set on this node)"))
    for row in rows:
        print(f"data set {row['dataset']} ({row['file']}, sha256 {row['sha256'][:12]}):")
        print(f"  budget    epsilon {row['budget_epsilon']:g} at delta {row['delta']:g} ({row['accountant']} accountant)")
        print(f"  spent     epsilon {row['spent_epsilon']:.4f} over {row['steps']} DP-SGD steps")
        print(f"  remaining epsilon {row['remaining_epsilon']:.4f}")
        for job, grant in row["grants"].items():
            rounds = row["jobs"].get(job, [])
            print(f"  job {job}: requested {grant['requested_epsilon']:g}, granted {grant['granted_epsilon']:.4f}, "
                  f"spent {grant['spent_epsilon']:.4f}; rounds {', '.join(map(str, rounds)) or '-'}")
        for change in row["budget_changes"]:
            when = datetime.fromtimestamp(change["changed"], timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
            print(f"  set {when} by {change['changed_by']}: epsilon {change['epsilon']:g}, delta {change['delta']:g}, "
                  f"{change['accountant']}" + (" (forced)" if change["forced"] else ""))
    return 0


def cmd_budget_set(args: argparse.Namespace) -> int:
    register(args, args.state_dir.expanduser().resolve(), "fedtune-client budget set")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    bundle = approval.parse_hash(args.hash)
    path = approval.approvals_file(args.state_dir.expanduser())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    approval.save(path, approval.with_approval(approval.load(path), bundle, args.note or "", when))
    say(f"approved app bundle sha256:{bundle} in {path}; jobs shipping it run from their next message on")
    return 0


def cmd_unapprove(args: argparse.Namespace) -> int:
    bundle = approval.parse_hash(args.hash)
    path = approval.approvals_file(args.state_dir.expanduser())
    approval.save(path, approval.without_approval(approval.load(path), bundle))
    say(f"revoked app bundle sha256:{bundle}; the node refuses its next message")
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    path = approval.approvals_file(args.state_dir.expanduser())
    approved = approval.load(path)
    if args.json:
        print(json.dumps(approved, indent=2, sort_keys=True))
        return 0
    if not approved:
        say(f"no app bundle approved in {path}")
    for bundle, entry in sorted(approved.items(), key=lambda item: item[1]["approved"]):
        print(f"{bundle}  approved {entry['approved']}  {entry.get('note', '')}".rstrip())
    return 0


def existing_file(value: str) -> Path:
    """argparse type: a file that exists (keys and certificates are only ever read from files)."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return Path(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune-client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="make this institution's node key pair (node.key, node.pub)")
    keygen.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for node.key (0600) and node.pub")
    keygen.add_argument("--comment", help="text appended to the public key line, e.g. the institution's name")
    keygen.set_defaults(run=cmd_keygen)

    check = commands.add_parser("check", help="check a data file against a job, locally (nothing is sent)")
    check.add_argument("data_file", type=Path, metavar="DATA_FILE", help="CSV, TSV or JSONL file of records")
    check.add_argument("--job", type=Path, required=True, metavar="JOB.toml", help="the job file from the coordinator")
    check.set_defaults(run=cmd_check)

    start = commands.add_parser("start", help="run this institution's node (until Ctrl-C)")
    start.add_argument("--superlink", required=True, type=address_arg, metavar="HOST:PORT", help="the coordinator's Fleet address")
    start.add_argument("--root-certificates", type=existing_file, metavar="CA.pem",
                       help="the consortium's CA certificate (required unless --insecure)")
    start.add_argument("--private-key", type=existing_file, metavar="KEY",
                       help="node.key from `fedtune-client keygen` (required unless --insecure)")
    start.add_argument("--data", type=existing_file, required=True, metavar="FILE", help="this institution's data file")
    start.add_argument("--name", required=True, help="this institution's name, as shown in the job's report")
    start.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    budget_flags(start)
    start.add_argument("--model", type=Path, metavar="DIR",
                       help="the only model folder this node loads; jobs must name it by its digest "
                       "(default: the packaged all-MiniLM-L6-v2)")
    start.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"node state: privacy ledger, installed apps, feature cache, progress.jsonl (default {DEFAULT_STATE})")
    start.add_argument("--host", default="127.0.0.1",
                       help="loopback address of the node's local app API (default 127.0.0.1)")
    start.add_argument("--port", type=int, default=9094, help="port of the node's local app API; one per node (default 9094)")
    start.add_argument("--insecure", action="store_true", help="connect without TLS (local trials only)")
    start.add_argument("--allow-any-bundle", action="store_true",
                       help="run any app bundle the coordinator ships, approved or not (development only)")
    start.add_argument("--pace", choices=get_args(Pace), default=DEFAULT_PACE,
                       help="how the node waits for messages: a short, backing-off poll, or Flower's fixed 3 s "
                       f"(default {DEFAULT_PACE})")
    start.set_defaults(run=cmd_start)

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, metavar="DIR",
                       help=f"the node's state folder, as given to `start` (default {DEFAULT_STATE})")
    approve = commands.add_parser("approve", parents=[state],
                                  help="let the node run the app bundle with this SHA-256 (`fedtune-server bundle` prints it)")
    approve.add_argument("hash", metavar="HASH", help="the bundle's SHA-256, 64 hex digits")
    approve.add_argument("--note", help="why, or who reviewed it; shown by `approvals`")
    approve.set_defaults(run=cmd_approve)

    unapprove = commands.add_parser("unapprove", parents=[state], help="revoke an app bundle's approval")
    unapprove.add_argument("hash", metavar="HASH", help="the bundle's SHA-256")
    unapprove.set_defaults(run=cmd_unapprove)

    approvals = commands.add_parser("approvals", parents=[state], help="list the approved app bundles")
    approvals.add_argument("--json", action="store_true", help="print JSON instead of text")
    approvals.set_defaults(run=cmd_approvals)

    budget = commands.add_parser("budget", parents=[state], help="show each data set's privacy budget, spent and remaining; "
                                 "`budget set` sets one")
    budget.add_argument("--json", action="store_true", help="print JSON instead of text")
    budget.set_defaults(run=cmd_budget)
    budget_set = budget.add_subparsers(dest="budget_command", metavar="set").add_parser(
        "set", parents=[state], help="set a data set's budget (recorded with who and when)")
    budget_set.add_argument("--data", type=existing_file, required=True, metavar="FILE", help="the data file")
    budget_flags(budget_set)
    budget_set.set_defaults(run=cmd_budget_set)
    return parser


def budget_flags(parser: argparse.ArgumentParser) -> None:
    """The data set's identity and budget: the institution operator's alone, never a job's."""
    parser.add_argument("--dataset-id", metavar="ID",
                        help="the data set's name in the ledger (default: derived once from the file, then kept); "
                        "edits of the file under the same id keep what it spent")
    parser.add_argument("--budget-epsilon", type=float, metavar="EPSILON",
                        help="epsilon this data set may spend over all jobs (required the first time)")
    parser.add_argument("--budget-delta", type=float, metavar="DELTA",
                        help="delta of that budget (required the first time; then pinned)")
    parser.add_argument("--accountant", choices=["rdp", "prv"], help="accountant of that budget (first time: default "
                        "prv; then pinned)")
    parser.add_argument("--force-budget-change", action="store_true",
                        help="allow changing a pinned delta or accountant (never if it lowers what was spent)")


def main(argv: list[str] | None = None) -> int:
    private_umask()  # before anything is written: ledger, approvals, cache, secrets are the operator's alone
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "start" and not args.insecure and None in (args.root_certificates, args.private_key):
        parser.error("TLS needs --root-certificates (the consortium's ca.pem) and --private-key "
                     "(node.key from `fedtune-client keygen`); --insecure is for local trials only")
    try:
        return args.run(args)
    except (ConfigError, DataError, NodeKeyError, ApprovalError, BudgetError, SettingError) as exc:
        print(f"fedtune-client: error: {exc}", file=sys.stderr)
        return 2
    except (NodeError, ProcessError) as exc:
        print(f"fedtune-client: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
