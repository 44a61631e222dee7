"""common/opacus_patch.py: Opacus' per-step RDP remembered in memory and beside the ledger, never a
different number, and never taken from a file another user could have written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from importlib.metadata import version

import pytest
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp

from common import accounting, flower_patch, opacus_patch
from common.config import REPO_ROOT

HISTORY = [(1.1, 0.25, 8), (0.9, 0.5, 3)]


def opacus_epsilon(history, accountant: str, delta: float = 1e-5) -> float:
    """Epsilon from a fresh Opacus accountant (no fedtune cache in front of it)."""
    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@pytest.fixture
def unmemoized(monkeypatch):
    """Opacus' own `_compute_rdp` for the test, the memo emptied; both restored afterwards."""
    monkeypatch.setattr(rdp, "_compute_rdp", getattr(rdp._compute_rdp, "__wrapped__", rdp._compute_rdp))
    monkeypatch.setattr(opacus_patch, "MEMO", {})


def test_the_installed_opacus_is_the_one_pinned_and_patched():
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "opacus==" + opacus_patch.OPACUS_VERSION in pins
    assert version("opacus") == opacus_patch.OPACUS_VERSION
    assert {name: flower_patch.source_digest(getattr(rdp, name)) for name in opacus_patch.PATCHED} == opacus_patch.PATCHED


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_a_memoised_epsilon_is_bitwise_the_one_opacus_computes(unmemoized, accountant):
    without = opacus_epsilon(HISTORY, accountant)
    assert opacus_patch.memoize_rdp() is None
    assert opacus_patch.memoize_rdp() is None  # twice is harmless
    first = opacus_epsilon(HISTORY, accountant)  # fills the memo
    assert opacus_patch.MEMO
    assert opacus_epsilon(HISTORY, accountant) == first == without  # from the memo


def test_the_patch_refuses_another_opacus_and_leaves_it_as_it_is(unmemoized, monkeypatch):
    original = rdp._compute_rdp
    monkeypatch.setattr(flower_patch, "version", lambda _package: "1.7.0")
    assert "opacus 1.7.0 is installed" in opacus_patch.memoize_rdp()
    assert rdp._compute_rdp is original


def test_a_memo_kept_beside_the_ledger_serves_the_next_process_unchanged(tmp_path):
    """A ClientApp is a fresh process per message: the next one must find every value of the
    ledger's mechanisms on disk, and compute the same epsilon from them."""
    memo = tmp_path / "rdp-memo.json"
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from common import accounting, opacus_patch
        memo = Path({str(memo)!r})
        loaded = opacus_patch.load_memo(memo)
        before = len(opacus_patch.MEMO)
        value = accounting.epsilon({HISTORY!r}, 1e-5, "prv")
        opacus_patch.save_memo(memo, [(noise, rate) for noise, rate, _ in {HISTORY!r}])
        print(json.dumps([loaded, before, len(opacus_patch.MEMO), value]))
    """)

    def process() -> list:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    _, before, filled, first = process()
    assert before == 0 and filled > 0
    assert oct(memo.stat().st_mode & 0o777) == "0o600"
    loaded, before, after, second = process()
    assert loaded is None and before == after  # every value came from the file: nothing computed
    assert second == first == opacus_epsilon(HISTORY, "prv")


def test_save_keeps_only_the_mechanisms_asked_for(unmemoized, tmp_path):
    opacus_patch.memoize_rdp()
    accounting._epsilon.cache_clear()
    accounting.epsilon(HISTORY, 1e-5, "rdp")
    opacus_patch.save_memo(tmp_path / "memo.json", [HISTORY[0][:2]])
    kept = json.loads((tmp_path / "memo.json").read_text())["entries"]
    assert kept and {(rate, noise) for rate, noise, _, _ in kept} == {(HISTORY[0][1], HISTORY[0][0])}


def write_memo(path, entries, **fields):
    path.write_text(json.dumps({"format": opacus_patch.MEMO_FORMAT, "opacus": opacus_patch.OPACUS_VERSION,
                                "entries": entries, **fields}))
    path.chmod(0o600)


@pytest.mark.parametrize("problem, expected", [
    ("group-writable", "other users could have written it"),
    ("other Opacus", "written for another Opacus"),
    ("torn", "not a memo of RDP values"),
    ("negative value", "not a memo of RDP values"),
    ("short entry", "not a memo of RDP values"),
])
def test_a_memo_another_user_or_a_kill_could_have_made_is_ignored_with_one_line(unmemoized, tmp_path, problem,
                                                                                expected):
    """Smaller values would make the ledger under-count: a file the institution's user alone wrote,
    whole and for this Opacus, is the only one taken."""
    memo = tmp_path / "rdp-memo.json"
    write_memo(memo, [[0.25, 1.1, 2.0, 0.5]])
    if problem == "group-writable":
        memo.chmod(0o620)
    elif problem == "other Opacus":
        write_memo(memo, [[0.25, 1.1, 2.0, 0.5]], opacus="1.5.4")
    elif problem == "torn":
        memo.write_text(memo.read_text()[:40])
    elif problem == "negative value":
        write_memo(memo, [[0.25, 1.1, 2.0, -0.5]])
    else:
        write_memo(memo, [[0.25, 1.1, 0.5]])
    reason = opacus_patch.load_memo(memo)
    assert reason.startswith(f"{memo}: ignored: ") and expected in reason and "\n" not in reason
    assert opacus_patch.MEMO == {}


def test_no_memo_file_is_no_reason(unmemoized, tmp_path):
    assert opacus_patch.load_memo(tmp_path / "absent.json") is None
