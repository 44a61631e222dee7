"""Institutions run only the app bundles their operators approved.

The pure parts (hash syntax, the approval list and its file) are checked directly; the gate is
checked with real processes: a TLS coordinator and two institutions (tests/deployment_support.py)
that approved this checkout's bundle. Both then revoke it and must refuse the next job before
any ClientApp exists, with a reason the coordinator operator reads; approved again, a job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client import approval
from client import cli as client_cli
from client.approval import ApprovalError
from client.gate import Gate
from common.config import REPO_ROOT
from common.messages import Reason, Refusal

from deployment_support import TEST_BUDGET, approve, cli, tail, write_job

HASH = "ab" * 32


def test_hash_is_64_hex_digits_with_an_optional_sha256_prefix():
    assert approval.parse_hash(f"  sha256:{HASH.upper()}\n") == HASH
    for bad in ("", HASH[:-1], HASH + "0", "g" * 64, f"md5:{HASH}"):
        with pytest.raises(ApprovalError, match="not a bundle hash"):
            approval.parse_hash(bad)


def test_approving_and_revoking_leave_the_other_entries_alone():
    other = "cd" * 32
    approvals = approval.with_approval({}, HASH, "reviewed by A", "2026-11-28 10:00:00Z")
    approvals = approval.with_approval(approvals, other, "", "2026-11-28 11:00:00Z")
    assert approvals[HASH] == {"approved": "2026-11-28 10:00:00Z", "note": "reviewed by A"}
    assert approval.without_approval(approvals, HASH) == {other: approvals[other]}
    with pytest.raises(ApprovalError, match=f"bundle {'ef' * 32} is not approved"):
        approval.without_approval(approvals, "ef" * 32)


def test_list_file_round_trips_and_is_replaced_whole(tmp_path):
    path = approval.approvals_file(tmp_path / "state")
    assert approval.load(path) == {}
    approvals = approval.with_approval({}, HASH, "note", "2026-11-28 10:00:00Z")
    approval.save(path, approvals)
    approval.save(path, approval.with_approval(approvals, "cd" * 32, "", "2026-11-28 11:00:00Z"))
    assert set(approval.load(path)) == {HASH, "cd" * 32}
    assert os.listdir(path.parent) == [approval.APPROVALS_FILE]  # no temporary file left behind


@pytest.mark.parametrize("content", ["{not json", json.dumps({"not-a-hash": {}}), json.dumps([HASH])])
def test_unreadable_list_is_an_error_naming_the_file(content, tmp_path):
    path = tmp_path / approval.APPROVALS_FILE
    path.write_text(content)
    with pytest.raises(ApprovalError, match=str(path)):
        approval.load(path)


def test_refusal_names_the_institution_and_the_hash_to_approve():
    refusal = Refusal.decode(approval.refusal("st-mary", HASH))  # a typed record, not free text
    assert refusal == Refusal("st-mary", Reason.BUNDLE_NOT_APPROVED, HASH)
    assert refusal.sentence.startswith("st-mary refused: its operator has not approved this app bundle")
    assert f"fedtune-client approve {HASH}" in refusal.sentence


def test_gate_runs_only_listed_bundles_and_fails_closed(tmp_path):
    gate = Gate("127.0.0.1:1", tmp_path, "st-mary", allow_any=False)
    assert gate.refusal_reason(HASH) == approval.refusal("st-mary", HASH)
    approval.save(approval.approvals_file(tmp_path), approval.with_approval({}, HASH, "", "2026-11-28 10:00:00Z"))
    assert gate.refusal_reason(HASH) is None
    assert gate.refusal_reason("cd" * 32) == approval.refusal("st-mary", "cd" * 32)
    assert gate.refusal_reason("") is not None  # a run without a bundle hash
    approval.approvals_file(tmp_path).write_text("{broken")
    assert gate.refusal_reason(HASH) == approval.refusal("st-mary", HASH)
    assert Gate("127.0.0.1:1", tmp_path, "st-mary", allow_any=True).refusal_reason("cd" * 32) is None


def test_operator_commands(tmp_path, capsys):
    state = str(tmp_path / "state")

    def run(*args: str) -> tuple[int, str, str]:
        code = client_cli.main([*args, "--state-dir", state])
        out, err = capsys.readouterr()
        return code, out, err

    assert "no app bundle approved" in run("approvals")[1]
    code, out, _ = run("approve", f"sha256:{HASH.upper()}", "--note", "reviewed")
    assert code == 0 and f"approved app bundle sha256:{HASH}" in out
    listed = run("approvals")[1]
    assert listed.startswith(HASH) and listed.rstrip().endswith("reviewed")
    code, _, err = run("approve", "deadbeef")
    assert code == 2 and err.count("\n") == 1 and "not a bundle hash" in err
    assert run("unapprove", HASH)[0] == 0
    code, _, err = run("unapprove", HASH)
    assert code == 2 and "is not approved on this node" in err
    assert json.loads(run("approvals", "--json")[1]) == {}


def test_bundle_hash_is_the_hash_of_the_bundle_flower_builds(bundle):
    assert bundle == hashlib.sha256(build_fab_from_disk(REPO_ROOT)).hexdigest()


def files_under(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file with its size and modification time: what changed on disk, down to a rewrite."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def submit(coordinator, job: Path, out: Path):
    started = time.monotonic()
    result = coordinator.run("submit", job, "--out", out, timeout=400)
    return result, time.monotonic() - started


def run_id_of(result) -> str:
    return result.stdout.split("submitted run ")[1].split(":")[0]


def test_unapproved_bundle_is_refused_before_any_clientapp_starts(coordinator, federation, bundle, banking_slice,
                                                                  slice_labels, env, tmp_path):
    states = {name: federation.folder / name / "state" for name in ("alpha", "beta")}
    logs = {name: federation.folder / f"{name}.log" for name in states}
    for state in states.values():
        assert cli("client", "unapprove", bundle, "--state-dir", state, env=env).returncode == 0
    before = {name: files_under(state) for name, state in states.items()}
    offsets = {name: len(log.read_text()) for name, log in logs.items()}
    try:
        job = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels, federation={"rounds": 1})
        result, seconds = submit(coordinator, job, tmp_path / "run")
        after = {name: files_under(state) for name, state in states.items()}
    finally:
        for state in states.values():
            approve(bundle, state, env)
    reason = f"refused: its operator has not approved this app bundle (sha256:{bundle}; `fedtune-client approve {bundle}`)"
    assert result.returncode == 1, result.stdout[-2000:]
    assert f"app bundle sha256:{bundle}" in result.stdout  # what submit said it ships
    assert "ended finished:failed" in result.stdout and reason in result.stdout
    status = coordinator.run("status", run_id_of(result))
    assert status.returncode == 0 and reason in status.stdout and bundle[:12] in status.stdout
    for name in states:
        # Nothing of the job reached the institution's disk: no ledger, no progress, no unpacked bundle.
        assert after[name] == before[name]
        output = logs[name].read_text()[offsets[name]:]
        assert f"REFUSED bundle sha256:{bundle}" in output
        assert "flwr-clientapp" not in output and "starting its ClientApp" not in output
    print(f"\nrefused job: {seconds:.0f} s from submit to failure")


def test_approved_bundle_runs_and_the_node_checks_the_hash_printed_before_submission(coordinator, federation, bundle,
                                                                                     banking_slice, slice_labels,
                                                                                     tmp_path):
    job = write_job(tmp_path / "job.toml", banking_slice[1], slice_labels, federation={"rounds": 1})
    result, seconds = submit(coordinator, job, tmp_path / "run")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{tail(federation.folder / 'beta.log')}"
    [run] = [run for run in coordinator.runs() if str(run["run-id"]) == run_id_of(result)]
    assert run["status"] == "finished:completed" and run["fab-hash"] == bundle
    for name in ("alpha", "beta"):
        log = (federation.folder / f"{name}.log").read_text()
        assert f"run {run['run-id']}: bundle sha256:{bundle} approved; starting its ClientApp" in log
        assert (federation.folder / name / "state" / "ledger.sqlite").is_file()
    print(f"\napproved job: {seconds:.0f} s end to end, 1 round")


def test_development_escape_hatch_warns_on_every_start(coordinator, data_files, env, tmp_path):
    """Both starts stop at the plaintext probe of the TLS coordinator, after saying what they will run."""
    common = ("client", "start", "--superlink", coordinator.fleet, "--insecure", "--data", data_files["alpha"],
              "--name", "dev", "--state-dir", tmp_path / "state", *TEST_BUDGET)
    result = cli(*common, "--allow-any-bundle", env=env)
    assert result.returncode == 1 and "WARNING: --allow-any-bundle: this node runs whatever code" in result.stderr
    result = cli(*common, env=env)
    assert "--allow-any-bundle" not in result.stderr and "no app bundle approved yet" in result.stdout


def test_the_bundle_holds_every_fedtune_module_the_apps_import():
    """Regression: client/privacy/ was left out of the bundle (`fab-include` globs one folder deep), so
    deployed ClientApps ran that code from the node's own install of fedtune instead of the approved bundle."""
    import io
    import subprocess
    import sys
    import zipfile

    code = ("import sys, client.app, client.round, server.app; "
            "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] in ('common', 'client', 'server') and getattr(m, '__file__', None))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    needed = {str(Path(path).relative_to(REPO_ROOT)) for path in loaded.stdout.split()}
    bundled = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO_ROOT))).namelist())
    assert needed and needed <= bundled, sorted(needed - bundled)
