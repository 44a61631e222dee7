"""Starting and stopping Flower's own programs (superlink, supernode, flwr) from fedtune.

Every Flower process gets the same environment: Flower's phone-home features off, its own
FLWR_HOME, and this Python's `bin` folder first on PATH (the SuperLink starts
`flower-superexec`, and the institution's bundle gate `flwr-clientapp`, by name). Each long-running one lives in its own process group, so stopping
it also stops the SuperExec and the app processes it spawned.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common.flower_env import FLOWER_DEFAULTS

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ProcessError(RuntimeError):
    """A Flower program that is missing, exited early or never opened its port."""


def flower_env(flwr_home: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in FLOWER_DEFAULTS.items():
        env.setdefault(name, value)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """The Flower program installed next to this Python, else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise ProcessError(f"{name}: not installed (pip install 'flwr==1.39.0')")
    return found


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def address_arg(value: str) -> str:
    """argparse type for HOST:PORT options."""
    try:
        split_address(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def dial_host(host: str) -> str:
    """The address to dial for a server bound to `host` (a wildcard bind is dialled on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class FlowerProcess:
    """One Flower program in its own process group."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None, stdout=None):
        """`stdout`: None inherits ours; subprocess.PIPE or an open file also takes stderr."""
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=None if stdout is None else subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self):
        return self.popen.stdout

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM the whole group (Flower shuts down cleanly on it), SIGKILL what is left after `grace`."""
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (SuperExec, app processes) may outlive the leader: clear the group either way.
        self.signal_group(signal.SIGKILL)
        return self.popen.wait()

    def wait_for_port(self, host: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if self.popen.poll() is not None:
                raise ProcessError(f"{Path(self.argv[0]).name} exited with code {self.popen.returncode}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{Path(self.argv[0]).name}: nothing listening on {host}:{port} after {timeout:.0f} s")
            time.sleep(0.2)


@contextlib.contextmanager
def on_stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """Call `handler(signum)` on Ctrl-C, SIGTERM or SIGHUP for the duration of the block."""
    previous = {signum: signal.signal(signum, lambda signum, _frame: handler(signum)) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
