"""The coordinator's SuperLink: Flower's `flower-superlink`, with its local doors closed.

`fedtune-server start` runs `python -m server.superlink --control-token-file FILE -- ARGS`, where
ARGS are `flower-superlink`'s own flags (server/coordinator.py, `superlink_command`). Flower
parses them and builds the SuperLink exactly as `flower-superlink` does; these change on the way,
without touching Flower's files (through the slots Flower provides, but for the pinned chores):

- Control API (admit institutions, submit jobs whose ServerApp runs as this user). Flower 1.39's
  open-source SuperLink lets every caller in: its account plugin is a no-op, and a real one
  (OIDC) ships only in Flower's enterprise edition. fedtune puts `TokenAuthn` in that plugin's
  place: a Control request needs `Authorization: Bearer TOKEN`, with the token from a 0600 file
  in the 0700 state folder. The `flwr` CLI sends it from its own credential store
  (FLWR_HOME/credentials.yaml, written 0600 by `Coordinator.write_connection`), as it would send
  an OIDC access token.
- Runtime API (ServerApp <-> SuperLink). With `--isolation process` and
  `--superexec-auth-secret-file`, only a SuperExec holding the secret may claim a run. In its
  default isolation Flower starts its own SuperExec and ignores the secret, so this SuperLink
  starts fedtune's (common/superexec.py), which also keeps task tokens off command lines.
- TLS 1.3 only on that port: uvicorn's default context, which `flower-superlink` uses, accepts 1.2.
  (The Fleet port is Flower's gRPC server, whose TLS versions Python cannot set: docs/operators.md.)
- Two of its chores run less often (server/link_chores.py), unless `--pace flower`: the sweep of
  expired task claims before nearly every state access, and the log stream's reads.
- Fleet faults are recorded (server/fleet_events.py): each node key the Fleet API refuses, named
  after the institution it was admitted as, and each failed TLS handshake on the Fleet port, which
  gRPC reports only in its own INFO log lines on stderr (read here, and not passed on).

Private parts of flwr 1.39 are used here (its argument parser and lifespan class), as
simulations/engine.py does; the pin in pyproject.toml keeps them where they are.
"""

from __future__ import annotations

import argparse
import atexit
import hmac
import json
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import get_args

import uvicorn
from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.common.logger import log
from flwr.server.superlink.fleet.grpc_rere.node_auth_server_interceptor import NodeAuthServerInterceptor
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.supercore.http_logging import get_uvicorn_log_config
from flwr.supercore.logger import console_handler
from flwr.superlink.auth_plugin import ControlAuthnPlugin
from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config

from common.config import DEFAULT_PACE, Pace
from common.superexec import TOKEN_DIR
from server import fleet_events, link_chores


class TokenAuthn(ControlAuthnPlugin):
    """A Control API request gets in only with the operator's token (Flower's no-op plugin lets anyone in)."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        return None  # nothing to log in to: the token is in files only the operator's user can read

    def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool, AccountInfo | None]:
        given = [value for key, value in metadata if key == ACCESS_TOKEN_KEY]
        if len(given) == 1:
            value = given[0].encode() if isinstance(given[0], str) else given[0]
            if hmac.compare_digest(value, self._token):
                # The account Flower's no-op plugin reports, so runs and federations stay whose they were.
                return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
        return False, None

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        return None

    def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[None, None]:
        return None, None  # a wrong token stays wrong: the operator's files hold the right one


def tls13_only(_config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's own TLS context for the certificate, raised to TLS 1.3 as the minimum."""
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


class Lifespan(SuperLinkLifespan):
    """Flower's SuperLink lifespan, starting fedtune's SuperExec instead of Flower's."""

    secret_file: Path

    def _start_superexec_if_needed(self) -> None:
        config = self.config
        host = f"[{config.host}]" if ":" in config.host else config.host
        command = [sys.executable, "-m", "common.superexec", "--runtime-api-address", f"{host}:{config.port}",
                   "--superexec-auth-secret-file", str(self.secret_file),
                   "--token-dir", str(self.secret_file.parent / TOKEN_DIR), "--parent-pid", str(os.getpid())]
        if config.ssl_ca_certfile is not None:
            command += ["--root-certificates", config.ssl_ca_certfile]
        self.superexec_process = subprocess.Popen(command)  # pylint: disable=consider-using-with


class FaultRecorder:
    """Appends Fleet faults to the events file and says each in one line of the SuperLink's log."""

    def __init__(self, events_file: Path, institutions_file: Path):
        self.events_file, self.institutions_file = events_file, institutions_file

    def add(self, event: fleet_events.FleetEvent) -> None:
        fleet_events.record(self.events_file, event)
        log(WARNING, "fedtune: %s", event.sentence())

    def refused_key(self, public_key: bytes) -> None:
        try:
            registry = json.loads(self.institutions_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            registry = {}
        self.add(fleet_events.refused_key(public_key, registry))


class KeyRefusalsRecorded(NodeAuthServerInterceptor):
    """Flower's node authentication, unchanged, recording each activation the Fleet API refuses."""

    recorder: FaultRecorder

    def intercept_service(self, continuation, handler_call_details):
        handler = super().intercept_service(continuation, handler_call_details)
        if not handler_call_details.method.endswith("/ActivateNode") or getattr(handler, "unary_unary", None) is None:
            return handler
        activate = handler.unary_unary

        def recorded(request, context):
            try:
                return activate(request, context)
            except Exception:
                self.recorder.refused_key(bytes(request.public_key))
                raise

        return handler._replace(unary_unary=recorded)


# A gRPC core log line: severity letter, date, time, thread, file:line].
_GRPC_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")


class StderrTap:
    """Reads this process's stderr (fd 2: Python's and gRPC core's) before passing it on.

    gRPC logs a failed TLS handshake only at INFO, so INFO is switched on for this process, each such
    line becomes a Fleet event, and gRPC's other INFO lines are dropped: the log reads as before."""

    def __init__(self, recorder: FaultRecorder):
        self.recorder = recorder
        self.original = os.dup(2)
        read, self.write = os.pipe()
        os.dup2(self.write, 2)
        self.thread = threading.Thread(target=self._pump, args=(read,), name="stderr-tap", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def _pump(self, read: int) -> None:
        with os.fdopen(read, "rb") as lines:
            for line in lines:
                grpc_line = _GRPC_LINE.match(line)
                if grpc_line and b"Log level INFO is not suitable" in line:
                    continue  # gRPC's notice about the INFO level this process asked for
                if grpc_line and grpc_line.group(1) == b"I":
                    fault = fleet_events.handshake_fault(line.decode(errors="replace"))
                    if fault is not None:
                        try:
                            self.recorder.add(fleet_events.FleetEvent(fleet_events.now(), fault))
                        except OSError:
                            pass
                    continue
                self._forward(line)

    def _forward(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.original, data):]

    def stop(self) -> None:
        """Give fd 2 back and pass on what is still in the pipe."""
        sys.stderr.flush()
        os.dup2(self.original, 2)
        os.close(self.write)
        self.thread.join(timeout=2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, separator, theirs = argv, [], []
    if "--" in argv:
        at = argv.index("--")
        ours, separator, theirs = argv[:at], argv[at:at + 1], argv[at + 1:]
    parser = argparse.ArgumentParser(prog="python -m server.superlink", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-token-file", type=Path, required=True, metavar="FILE",
                        help="file holding the Control API token (0600)")
    parser.add_argument("--fleet-events-file", type=Path, required=True, metavar="FILE",
                        help="where refused node keys and failed TLS handshakes are recorded (server/fleet_events.py)")
    parser.add_argument("--institutions-file", type=Path, required=True, metavar="FILE",
                        help="the coordinator's admitted institutions, to name a refused key")
    parser.add_argument("--pace", choices=get_args(Pace), default=DEFAULT_PACE,
                        help="'fast': run two chores less often (server/link_chores.py); 'flower': as Flower does")
    args = parser.parse_args(ours)
    if not separator:
        parser.error("give flower-superlink's flags after --")
    secret = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    secret.add_argument("--superexec-auth-secret-file", type=Path, required=True)
    secret.add_argument("--isolation", choices=["process"], required=True)
    Lifespan.secret_file = secret.parse_known_args(theirs)[0].superexec_auth_secret_file.resolve()

    sys.argv = ["flower-superlink", *theirs]  # Flower's parser reads sys.argv
    config = _parse_superlink_lifespan_config()
    config.authn_plugin = TokenAuthn(args.control_token_file.read_text(encoding="utf-8").strip())
    KeyRefusalsRecorded.recorder = FaultRecorder(args.fleet_events_file, args.institutions_file)
    # What Flower's lifespan builds its Fleet server with (the module: `flwr.superlink.cli` exports a function of its name).
    sys.modules[SuperLinkLifespan.__module__].NodeAuthServerInterceptor = KeyRefusalsRecorded
    if os.environ.get("GRPC_VERBOSITY") != fleet_events.GRPC_LOG_ENV["GRPC_VERBOSITY"]:
        log(WARNING, "fedtune: GRPC_VERBOSITY is not INFO: failed TLS handshakes on the Fleet port go unrecorded")
    StderrTap(KeyRefusalsRecorded.recorder)
    if args.pace != "flower":
        reason = link_chores.pace()
        if reason is None:
            log(INFO, "fedtune: %s", link_chores.PACED)
        else:
            log(WARNING, "fedtune: the SuperLink's chores run at Flower's pace: %s", reason)
    from flwr.superlink.main import create_app  # pylint: disable=import-outside-toplevel

    app = create_app(config, Lifespan)
    tls = config.ssl_certfile is not None
    uvicorn.run(  # as flower-superlink runs it (its _run_superlink_http_api), TLS 1.3 only
        app=app, host=config.host, port=config.port, reload=False, access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level), workers=1,
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
        ssl_context_factory=tls13_only if tls else None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
