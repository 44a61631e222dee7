"""Starting and stopping Flower's own programs (superlink, supernode, flwr) from fedtune.

Every Flower process gets the same environment: Flower's phone-home features off, its own
FLWR_HOME, and this Python's `bin` folder first on PATH (fedtune's SuperExecs start
`flwr-serverapp` and `flwr-clientapp` by name). Each long-running one lives in its own process group, so stopping
it also stops the SuperExec and the app processes it spawned.

The local surfaces around them are the operator's alone: every fedtune tool sets umask 077
first (`private_umask`), state folders are 0700 (`private_dir`), secrets are files passed by
path (`write_secret`), and local APIs bind loopback only (`require_loopback`).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common.flower_env import FLOWER_DEFAULTS

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ProcessError(RuntimeError):
    """A Flower program that is missing, exited early or never opened its port."""


class SettingError(ValueError):
    """A setting refused before anything starts (one line, naming the flag or file)."""


SUPEREXEC_SECRET = "superexec.secret"  # in a state folder: signs a SuperExec's task claims (common/superexec.py)
SSH_TUNNEL_HINT = "to reach it from another machine, use an SSH tunnel (docs/operators.md, 'Remote administration')"


def private_umask() -> None:
    """Owner-only from the first byte on: every fedtune tool calls this before it writes anything.

    Inherited by every process it starts (SuperLink, SuperNode, gate, app processes, Ray), so the
    state folders, ledgers, caches of hidden states, run folders and secrets are 0700/0600 even
    where the code that writes them (Flower's, Ray's) sets no mode.
    """
    os.umask(0o077)


def private_dir(path: Path) -> Path:
    """Create `path` 0700 (parents too), and take group/other bits off whatever is already in it.

    State folders made by an older fedtune, or under another umask, are 0755 with 0644 files; a
    start tightens them before any secret is written there. Symbolic links are left alone.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files, ""]:
            entry = os.path.join(folder, name) if name else folder
            mode = os.lstat(entry).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                os.chmod(entry, stat.S_IMODE(mode) & 0o700)
    return path


def write_private(path: Path, data: bytes) -> Path:
    """`data` in `path`, 0600 from its first byte whatever the umask, replaced atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_secret(path: Path, size: int = 32) -> Path:
    """A fresh secret of `size` random bytes in `path` (0600), new at every start.

    Processes get the file's path, never its content: a value on a command line is readable by
    every local user (`ps`, /proc/PID/cmdline).
    """
    return write_private(path, secrets.token_bytes(size))


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def require_loopback(host: str, flag: str, what: str) -> str:
    """Refuse a bind address other local machines could reach: `what` authenticates too little."""
    if not is_loopback(host):
        raise SettingError(f"{flag} {host}: {what} listens on loopback only (127.0.0.1 or ::1); {SSH_TUNNEL_HINT}")
    return host


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

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None = None, stdout=None,
                 name: str | None = None):
        """`stdout`: None inherits ours; subprocess.PIPE or an open file also takes stderr. `name`
        for messages (default: the program's file name)."""
        self.argv = argv
        self.name = name or Path(argv[0]).name
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
                raise ProcessError(f"{self.name} exited with code {self.popen.returncode}")
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.name}: nothing listening on {host}:{port} after {timeout:.0f} s")
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
