"""`make test`'s grouping and order reach pytest-xdist (tests/conftest.py).

When conftest's hook ran after xdist's (or under pytest 9.2, whose test ids xdist 3.8 can no longer
rename), the groups were lost: every test was scheduled on its own, each worker started the same
modules' coordinators and federations again, and two Ray simulations competed for the two cores.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LONGEST_FIRST, group_of

TESTS = Path(__file__).resolve().parent


def test_each_tests_id_carries_its_group_under_make_test(request):
    if not getattr(request.config.option, "loadgroup", False):  # what xdist sets in a `--dist loadgroup` worker
        pytest.skip("only under make test's `-n 2 --dist loadgroup`")
    assert request.node.nodeid.endswith("@test_grouping"), request.node.nodeid


def test_the_longest_groups_are_handed_out_first():
    listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(TESTS)],
                            capture_output=True, text=True, cwd=TESTS.parent, timeout=300, check=True).stdout
    modules = [line.split("::")[0].rpartition("/")[2].removesuffix(".py") for line in listed.splitlines() if "::" in line]
    groups = list(dict.fromkeys(group_of(module) for module in modules))
    assert groups[:len(LONGEST_FIRST)] == list(LONGEST_FIRST)
