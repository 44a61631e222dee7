"""Operator commands that do not train must not pay for torch, Opacus or transformers.

Each of these took 13-28 s on a busy 2-core machine when the CLIs imported Opacus through the
ledger; the heavy packages belong to the code that trains or accounts. Real commands run in a
fresh interpreter, which then reports the heavy modules it loaded.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "opacus", "transformers", "peft", "ray")
RUN_AND_REPORT = """
import importlib, sys
module, *argv = sys.argv[1:]
try:
    importlib.import_module(module).main(argv)
except SystemExit:
    pass
print("loaded:", ",".join(name for name in {heavy!r} if name in sys.modules))
"""


def heavy_modules_loaded(module: str, *argv: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT.format(heavy=HEAVY), module, *argv],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("loaded:"))
    return [name for name in line.removeprefix("loaded:").strip().split(",") if name]


@pytest.mark.parametrize("module", ["client.cli", "server.cli", "simulations.cli"])
def test_importing_a_cli_loads_no_training_package(module):
    assert heavy_modules_loaded(module, "--help") == []


def test_operator_commands_that_do_not_train_load_no_training_package(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert heavy_modules_loaded("client.cli", "approvals", "--state-dir", str(state)) == []
    assert heavy_modules_loaded("client.cli", "budget", "--state-dir", str(state)) == []
    assert heavy_modules_loaded("server.cli", "bundle") == []
    assert heavy_modules_loaded("simulations.cli", "--print-config") == []
