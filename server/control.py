"""The coordinator's two questions to Flower's Control API (its runs, its nodes), asked in this process.

`flwr ls` and `flwr supernode ls` are each a fresh Python process of about 2 CPU-seconds of
imports, and the supervisor, `submit`'s follower and the live console ask them all the time,
while the job they watch needs the cores (BENCHMARKS.md). Here the same requests go through
Flower's own code that those commands run, `_list_runs`, `_display_one_run` and `_list_nodes`
with their `_to_json`, over Flower's Control API client with the operator's token: the answer
is what `flwr ... --format json` prints, and Flower's error reasons stay Flower's. Those functions
are private to flwr 1.39.0, so they are pinned by source digest (tests/test_flower_pins.py);
with any other code `ask` returns None and the caller runs the `flwr` CLI instead. The CLI's
runtime-version header is not sent: the SuperLink of the one pinned Flower accepts requests
without it.
"""

from __future__ import annotations

import functools
import importlib
import json
import tomllib
from pathlib import Path

import click
import httpx
from flwr.supercore.control import ControlHttpClient

from common.flower_patch import mismatch

CONNECTION = "fedtune"  # the connection's name in FLWR_HOME/config.toml (server/coordinator.py writes it)
RUNS_CODE = "flwr.cli.ls"  # `flwr ls`
NODES_CODE = "flwr.cli.supernode.ls"  # `flwr supernode ls`
PINS = {
    RUNS_CODE: {
        "_list_runs": "b7077dcfa5e8738bd099e2449312758cc60db55b8a2925d6c8a8021201816090",
        "_display_one_run": "d78870bf8a131e4f27f1e02719b31a960e81b2a430686195543dd7a0ba9b9e5f",
        "_to_json": "bed345d19aca6f9f69cbf1d3a496497a5a0f330d0f37b082e587e37dfe10e96c",
    },
    NODES_CODE: {
        "_list_nodes": "86d809c4e9ad42b48f62c0cf0e1d2062dbe39c053a79db0c3880192e847003d1",
        "_to_json": "f9f8809e4102368595cffda11e515f2909e85c3d1c21fff1bc0e2631179cd284",
    },
}


# How each command formats its rows for `--format json` (`flwr supernode ls` without `--verbose`).
TO_JSON = {RUNS_CODE: {}, NODES_CODE: {"verbose": False}}


class ControlError(Exception):
    """Flower's own one-line reason (SuperLink unreachable, authentication failed, no such run)."""


class BearerToken:
    """Presents the operator's Control API token, as the `flwr` CLI does from its credential store."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept(self, context, call_next):
        context.request.headers["Authorization"] = f"Bearer {self._token}"
        return call_next(context)


@functools.cache
def unpinned() -> str | None:
    """Why Flower's `ls` code is not the code pinned here, or None (digested once per process)."""
    for module, pins in PINS.items():
        if (reason := mismatch(importlib.import_module(module), pins)) is not None:
            return reason
    return None


def _question(args: tuple[str, ...]) -> tuple[str, str, tuple] | None:
    """(Flower's module, its function, the function's argument after the client) for a CLI command line."""
    if args == ("ls",):
        return RUNS_CODE, "_list_runs", ()
    if args[:2] == ("ls", "--run-id") and len(args) == 3 and args[2].isascii() and args[2].isdigit() \
            and int(args[2]) < 2**64:
        return RUNS_CODE, "_display_one_run", (int(args[2]),)
    if args == ("supernode", "ls"):
        return NODES_CODE, "_list_nodes", ()
    return None  # the CLI's, with its own checks and messages


def _client(flwr_home: Path, token_file: Path) -> ControlHttpClient:
    """A Control API client for the connection `flwr` would use (FLWR_HOME/config.toml), with the token."""
    connection = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"][CONNECTION]
    insecure = connection.get("insecure") is True
    ca = connection.get("root-certificates")
    return ControlHttpClient.from_server_address(
        server_address=connection["address"], insecure=insecure,
        root_certificates=None if insecure or ca is None else Path(ca).read_bytes(),
        interceptors=[BearerToken(token_file.read_text().strip())],
    )


def ask(flwr_home: Path, token_file: Path, *args: str) -> dict | None:
    """The answer `flwr ARGS fedtune --format json` would print, for ARGS `ls`, `ls --run-id N` or
    `supernode ls`; None for any other ARGS, or when Flower's code is not the pinned one (then the
    caller runs the CLI). ControlError, one line, for any failure: Flower's reason where it gives one."""
    question = _question(args)
    if question is None or unpinned() is not None:
        return None
    module, function, extra = question
    code = importlib.import_module(module)
    try:
        with _client(flwr_home, token_file) as client:
            return json.loads(code._to_json(getattr(code, function)(client, *extra), **TO_JSON[module]))
    except click.ClickException as error:  # what Flower's CLI prints as its error message
        raise ControlError(error.message) from None
    except (OSError, KeyError, ValueError, httpx.HTTPError) as error:  # TOMLDecodeError is a ValueError
        raise ControlError(f"flwr {' '.join(args)}: {type(error).__name__}: {error}") from None
