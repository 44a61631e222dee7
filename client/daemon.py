"""The institution's node: a Flower SuperNode kept running against the coordinator.

Before each start it checks the coordinator's Fleet port the way the SuperNode will dial it (TLS,
the consortium CA, the host name, HTTP/2), so a wrong CA or certificate is a one-line error
instead of a silent retry loop. When the SuperNode exits on its own it is restarted with backoff
(network faults, a coordinator restart), unless its output shows a fault no restart can fix: the
coordinator refused this institution's key, or the TLS handshake failed.

The SuperNode runs with `--isolation process`, so it starts no app process itself: the bundle
gate (client/gate.py), started beside it and ending with it, starts a ClientApp only for an app
bundle this institution's operator approved (client/approval.py). A SuperNode stuck on the reply
of a ClientApp that died handing it over is restarted too (client/watchdog.py).
"""

from __future__ import annotations

import collections
import signal
import ssl
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from client.watchdog import ReplyWatch
from common.config import DEFAULT_PACE, NodeConfig, Pace
from common.processes import (
    SUPEREXEC_SECRET,
    FlowerProcess,
    dial_host,
    flower_env,
    flower_executable,
    on_stop_signals,
    split_address,
    write_secret,
)
from common.progress import ENV_VAR as PROGRESS_ENV

PROBE_TIMEOUT = 10.0
MAX_BACKOFF = 60.0
STABLE_AFTER = 300.0  # a SuperNode that ran this long before exiting restarts without delay growth
# Flower counts a node online for 2 heartbeats (2 x 30 s) after it last spoke, and refuses to
# activate an online node: a hard-killed SuperNode's successor is refused for up to that long.
ONLINE_PATIENCE = 90.0
ONLINE_RETRY = 10.0
RUNNING_MARKER = "daemon.running"  # in the state folder while a daemon runs there

REFUSED = (
    "the coordinator refused this institution's key: it was never admitted, or it was revoked "
    "(or a node with this key was killed under a minute ago and still counts as online). "
    "Send node.pub to the coordinator operator; a revoked key needs a new `fedtune-client keygen`"
)
# (text in the SuperNode's output, what the operator should know); checked in order.
FATAL_OUTPUT = (
    ("Failed to activate SuperNode", REFUSED),
    ("SSL/TLS handshake error", "TLS handshake with the coordinator failed (wrong CA file, or its certificate changed)"),
    ("Exit Code: 302", "the private key is not an EC key Flower can use; make one with `fedtune-client keygen`"),
)


class NodeError(RuntimeError):
    """A fault restarting cannot fix; one line for the institution operator."""


@dataclass(frozen=True)
class NodeSettings:
    superlink: str
    data: Path
    name: str
    state_dir: Path
    root_certificates: Path | None  # None: --insecure
    private_key: Path | None
    dataset_id: str  # registered in the ledger, with its budget, before the node starts
    model_dir: Path  # the only model this node loads
    model_sha256: str
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 9094
    allow_any_bundle: bool = False  # development only: the gate runs unapproved bundles too
    pace: Pace = DEFAULT_PACE

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def node_config_file(self) -> Path:
        return self.state_dir / "node-config.toml"

    @property
    def progress_file(self) -> Path:
        return self.state_dir / "progress.jsonl"


def write_node_config(settings: NodeSettings) -> Path:
    """What the ClientApp reads from `context.node_config` (common.config.NodeConfig), as a TOML file.

    Flower takes `--node-config FILE.toml` as well as `'k="v" ...'`; the file keeps paths with
    quotes or spaces intact and records what the node was started with. The budget is not in it:
    it lives in the ledger under `dataset-id`, set by the operator alone.
    """
    config = NodeConfig(
        name=settings.name, data_path=settings.data.resolve(), dataset_id=settings.dataset_id,
        state_dir=settings.state_dir, cache_dir=settings.state_dir / "cache", device=settings.device,
        model_dir=settings.model_dir.resolve(), model_sha256=settings.model_sha256,
    )
    settings.node_config_file.write_text(tomli_w.dumps(config.to_flower()), encoding="utf-8")
    return settings.node_config_file


def supernode_command(settings: NodeSettings) -> list[str]:
    # Flower's SuperNode; with a short idle poll (client/supernode.py) unless `pace` asks for Flower's own.
    launcher = [sys.executable, "-m", "client.supernode"]
    if settings.pace == "flower":
        launcher = [flower_executable("flower-supernode")]
    command = [*launcher, "--superlink", settings.superlink]
    if settings.root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(settings.root_certificates.resolve()),
                    "--auth-supernode-private-key", str(settings.private_key.resolve())]
    return command + [
        "--host", settings.host, "--port", str(settings.port),
        "--node-config", str(settings.node_config_file),
        "--isolation", "process",  # app processes are started by the bundle gate, not by the SuperNode
        # Only a process holding this secret (the gate) may claim the tasks on the local app API.
        "--superexec-auth-secret-file", str(settings.state_dir / SUPEREXEC_SECRET),
    ]


def gate_command(settings: NodeSettings, supernode_pid: int) -> list[str]:
    command = [sys.executable, "-m", "client.gate",
               "--runtime-api-address", f"{dial_host(settings.host)}:{settings.port}",
               "--state-dir", str(settings.state_dir), "--name", settings.name,
               "--superexec-auth-secret-file", str(settings.state_dir / SUPEREXEC_SECRET),
               "--parent-pid", str(supernode_pid), "--pace", settings.pace,
               "--model-dir", str(settings.model_dir.resolve()), "--model-sha256", settings.model_sha256]
    return command + (["--allow-any-bundle"] if settings.allow_any_bundle else [])


def probe(superlink: str, root_certificates: Path | None) -> str | None:
    """Check the Fleet port as the SuperNode will see it.

    Returns None when it is ready, or a transient reason (not reachable yet) to retry on.
    Raises NodeError on a fault no retry fixes.
    """
    host, port = split_address(superlink)
    try:
        sock = socket.create_connection((host, port), timeout=PROBE_TIMEOUT)
    except OSError as exc:
        return f"coordinator not reachable at {superlink} ({exc.strerror or exc})"
    with sock:
        if root_certificates is None:
            return _probe_plaintext(sock, superlink)
        context = ssl.create_default_context(cafile=str(root_certificates))
        context.set_alpn_protocols(["h2"])
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                if tls.selected_alpn_protocol() != "h2":
                    raise NodeError(f"{superlink} speaks TLS but not HTTP/2: is it the coordinator's Fleet address?")
        except ssl.SSLCertVerificationError as exc:
            raise NodeError(
                f"coordinator at {superlink}: certificate rejected: {exc.verify_message} "
                f"(checked against {root_certificates})"
            ) from None
        except ssl.SSLError as exc:
            raise NodeError(f"coordinator at {superlink}: TLS failed: {exc.reason or exc}") from None
        except OSError as exc:
            return f"coordinator at {superlink} closed the connection ({exc})"
    return None


def _probe_plaintext(sock: socket.socket, superlink: str) -> None:
    """With --insecure: a coordinator that answers a TLS handshake would never accept plaintext."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=None):
            pass
    except (ssl.SSLError, OSError):
        return None  # no TLS on that port: a plaintext coordinator, as --insecure expects
    raise NodeError(
        f"the coordinator at {superlink} requires TLS: drop --insecure and pass "
        "--root-certificates CA.pem and --private-key node.key"
    )


def _fatal_reason(output: collections.deque[str]) -> str | None:
    text = "\n".join(output)
    for needle, reason in FATAL_OUTPUT:
        if needle in text:
            return reason
    return None


def _echo(stream, *sinks) -> None:
    """Copy a child's output to ours, handing each line to `sinks` too."""
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        for sink in sinks:
            sink(line.rstrip("\n"))


class Supervisor:
    """Runs the SuperNode until asked to stop, restarting it after unexpected exits."""

    def __init__(self, settings: NodeSettings, say=print):
        self.settings = settings
        self.say = say
        self.stopping = threading.Event()
        self.process: FlowerProcess | None = None
        self.gate: FlowerProcess | None = None

    def request_stop(self, _signum: int = signal.SIGTERM) -> None:
        self.stopping.set()
        for process in (self.process, self.gate):
            if process is not None:
                process.signal_group(signal.SIGTERM)

    def run(self) -> None:
        """Returns after a stop request; raises NodeError on a fault restarting cannot fix."""
        settings = self.settings
        write_node_config(settings)
        write_secret(settings.state_dir / SUPEREXEC_SECRET)  # new for each daemon; SuperNode and gate read it
        # Left behind only when the last daemon on this state folder was killed: its SuperNode may
        # still count as online at the coordinator, so a refusal is not final yet.
        marker = settings.state_dir / RUNNING_MARKER
        refusal_final_at = time.monotonic() + ONLINE_PATIENCE if marker.exists() else 0.0
        marker.touch()
        try:
            self._supervise(refusal_final_at)
        finally:
            marker.unlink(missing_ok=True)

    def _supervise(self, refusal_final_at: float) -> None:
        """Before `refusal_final_at`, a refusal may only mean a killed predecessor still counts as online."""
        settings = self.settings
        env = flower_env(settings.flwr_home, {PROGRESS_ENV: str(settings.progress_file.resolve())})
        backoff = 2.0
        with on_stop_signals(self.request_stop):
            while not self.stopping.is_set():
                waiting = probe(settings.superlink, settings.root_certificates)
                if waiting:
                    self.say(f"{waiting}; retrying in {backoff:.0f} s")
                    backoff = self._pause(backoff)
                    continue
                started = time.monotonic()
                output, stuck = self._run_once(env)
                if self.stopping.is_set():
                    return
                if stuck:  # stopped by us, maybe before it could sign off with the coordinator
                    refusal_final_at = time.monotonic() + ONLINE_PATIENCE
                code = self.process.poll()
                reason = _fatal_reason(output)
                if reason == REFUSED and time.monotonic() < refusal_final_at:
                    self.say(f"the coordinator still counts the killed SuperNode as online; retrying in {ONLINE_RETRY:.0f} s")
                    self.stopping.wait(ONLINE_RETRY)
                    continue
                if reason:
                    raise NodeError(reason)
                if code < 0:  # killed by a signal: it could not sign off with the coordinator
                    refusal_final_at = time.monotonic() + ONLINE_PATIENCE
                if time.monotonic() - started > STABLE_AFTER:
                    backoff = 2.0
                self.say(f"the SuperNode exited (code {code}); restarting in {backoff:.0f} s")
                backoff = self._pause(backoff)

    def _run_once(self, env: dict[str, str]) -> tuple[collections.deque[str], bool]:
        """Run one SuperNode and its bundle gate to the end of either, or until the SuperNode is
        stuck, echoing both outputs. Returns the SuperNode's last lines, and whether it was stuck."""
        self.process = FlowerProcess(supernode_command(self.settings), env, stdout=subprocess.PIPE)
        self.say(f"SuperNode started (pid {self.process.pid}), connecting to {self.settings.superlink} as {self.settings.name}")
        tail: collections.deque[str] = collections.deque(maxlen=50)
        watch = ReplyWatch()

        def seen(line: str) -> None:
            watch.saw(line, time.monotonic())

        self.gate = FlowerProcess(gate_command(self.settings, self.process.pid), env, stdout=subprocess.PIPE)
        echoes = [threading.Thread(target=_echo, args=(self.process.stdout, tail.append, seen), daemon=True),
                  threading.Thread(target=_echo, args=(self.gate.stdout, seen), daemon=True)]
        for echo in echoes:
            echo.start()
        stuck = False
        try:
            while self.process.poll() is None:
                if self.gate.poll() is not None and not self.stopping.is_set():
                    self.say(f"the bundle gate exited (code {self.gate.poll()}); stopping the SuperNode to restart both")
                    break
                if watch.stuck(time.monotonic()):
                    stuck = True
                    self.say(f"the SuperNode has waited over {watch.stuck_after:.0f} s for a reply whose ClientApp died "
                             "handing it over, and Flower 1.39 never gives up on it; restarting the SuperNode")
                    break
                time.sleep(0.5)
        finally:
            # Each stop clears a whole process group: the gate's ClientApps go with the gate.
            self.process.stop()
            self.gate.stop()
        for echo in echoes:
            echo.join()
        return tail, stuck

    def _pause(self, backoff: float) -> float:
        self.stopping.wait(backoff)
        return min(backoff * 2, MAX_BACKOFF)
