"""The node's bundle gate: starts a ClientApp only for an app bundle its operator approved.

Flower 1.39's SuperNode has no hook of its own for this (`--trusted-entities` needs signatures
from Flower's hosted review service). But run with `--isolation process` it starts no app
process at all: it queues one task per message from the coordinator, each carrying the hash of
the run's bundle, and waits for a SuperExec to claim it on its local Runtime API. This module is
that SuperExec. It reads the task's hash before any process for it exists; an approved task goes
to Flower's own launcher (`flwr-clientapp`, started exactly as `flower-superexec` would), an
unapproved one is answered by the gate with an error reply that carries the reason, so the
coordinator's job fails with it instead of waiting out the round. The refused bundle is never
unpacked, let alone imported. The SuperNode stores a bundle only under the SHA-256 of its bytes,
so the hash checked is the hash of the code `flwr-clientapp` would install.

As the ClientApps' parent, the gate is also the one to see one die before finishing; it says so
in a line the daemon's watchdog reads (client/watchdog.py).

No other local process can take the gate's place: the SuperNode runs with
`--superexec-auth-secret-file`, and accepts a task claim only signed with that secret (a 0600 file
in the 0700 state folder). Each ClientApp gets its task's token in an owner-only file, not on its
command line (common/superexec.py).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import get_args

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import RunNotRunningException
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.plugin import AutoExecPlugin
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from client.approval import ApprovalError, approvals_file, load, refusal
from client.warm_start import WarmExecutor
from client.watchdog import CLIENTAPP_DIED
from common.config import DEFAULT_PACE, Pace
from common.polling import Backoff
from common.processes import SettingError, port_open, split_address
from common.superexec import TOKEN_DIR, TokenFileExecutor, read_secret
from common.superexec import runtime_client as signing_client

POLL_SECONDS = 1.0  # flower-superexec's default


def say(message: str) -> None:
    print(f"fedtune-client: bundle gate: {message}", flush=True)


def runtime_client(address: str, *interceptors) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API (plain HTTP on loopback, as Flower's own SuperExec uses)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
    )


def refuse(address: str, token: str, reason: str) -> None:
    """Answer the task as its ClientApp would, with an error reply and a failed status."""
    client = runtime_client(address, RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                            RuntimeTokenHttpInterceptor(token))
    try:
        message, context, _, _ = pull_task_input(client)
        push_message(client, Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message), context)
        push_task_output(client, context, SubStatus.FAILED, reason)
    finally:
        client.close()


def report_exits() -> None:
    """Collect the ClientApps that ended; name those killed before finishing. One that fails on
    its own (a declined round exits with code 1) has answered its message first."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child at all
            return
        if pid == 0:  # none has ended
            return
        if os.WIFSIGNALED(status):
            say(f"{CLIENTAPP_DIED} (pid {pid}, killed by signal {os.WTERMSIG(status)})")


class Gate:
    def __init__(self, address: str, state_dir: Path, name: str, allow_any: bool, secret: bytes | None = None,
                 warm: bool = False, model_dir: Path | None = None, model_sha256: str | None = None):
        """`secret`: the SuperNode's SuperExec auth secret, which signs the gate's task claims. `warm`:
        ClientApps forked from this process once it has imported the training libraries and the code of
        the node's model (`model_dir`) and loaded that model if it is the pinned one (`model_sha256`), see
        client/warm_start.py."""
        self.address, self.name, self.allow_any, self.secret = address, name, allow_any, secret
        self.approvals = approvals_file(state_dir)
        token_dir = Path(state_dir) / TOKEN_DIR
        self.executor = WarmExecutor(token_dir, model_dir, model_sha256) if warm else TokenFileExecutor(token_dir)
        self.launcher = AutoExecPlugin(runtime_api_address=address, insecure=True, root_certificates_path=None,
                                       executor=self.executor)

    def refusal_reason(self, bundle: str) -> str | None:
        """None when the bundle may run; else the reason the coordinator is told."""
        if self.allow_any:
            return None
        try:
            approved = bundle in load(self.approvals)
        except ApprovalError as exc:
            say(f"refusing every bundle: {exc}")
            approved = False
        return None if approved else refusal(self.name, bundle)

    def handle(self, token: str, task: Task) -> None:
        reason = self.refusal_reason(task.fab_hash)
        if reason is None:
            say(f"run {task.run_id}: bundle sha256:{task.fab_hash} approved; starting its ClientApp")
            report_exits()  # Python's subprocess reaps finished children unasked at each launch
            self.launcher.launch_task(token=token, task=task)
            return
        say(f"run {task.run_id}: REFUSED bundle sha256:{task.fab_hash}: not in {self.approvals}")
        try:
            refuse(self.address, token, reason)
        except RunNotRunningException:
            say(f"run {task.run_id} has already ended")

    def serve(self, backoff: Backoff | None = None) -> None:
        """Claim tasks forever: `backoff` between claims (reset by each task), or None: Flower's 1 s."""
        host, port = split_address(self.address)
        while not port_open(host, port):  # the SuperNode opens its Runtime API within seconds
            time.sleep(0.2)
        client = signing_client(self.address, self.secret)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while True:
                report_exits()
                self.executor.sweep()
                answer = client.AcquireTask(request)
                if answer.HasField("task") and answer.token:
                    self.handle(answer.token, answer.task)
                    if backoff is not None:
                        backoff.reset()
                time.sleep(POLL_SECONDS if backoff is None else backoff.next())
        finally:
            self.executor.close()
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT", help="the SuperNode's Runtime API")
    parser.add_argument("--state-dir", type=Path, required=True, metavar="DIR", help="the node's state folder")
    parser.add_argument("--name", required=True, help="the institution's name, for the refusal reason")
    parser.add_argument("--superexec-auth-secret-file", type=Path, required=True, metavar="FILE",
                        help="the secret the SuperNode was started with (0600), to sign task claims")
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode's pid; the gate ends with it")
    parser.add_argument("--allow-any-bundle", action="store_true", help="run every bundle (development only)")
    parser.add_argument("--pace", choices=get_args(Pace), default=DEFAULT_PACE,
                        help="'fast': claim tasks on a short, backing-off poll and start ClientApps warm; 'flower': "
                        "every 1 s, each ClientApp a fresh process (common.config.Pace)")
    parser.add_argument("--model-dir", type=Path, metavar="DIR", help="the node's pinned model, whose code (and, "
                        "with --model-sha256, the model itself) warm ClientApps find loaded")
    parser.add_argument("--model-sha256", metavar="HEX", help="the digest the node pinned the model folder at")
    args = parser.parse_args(argv)
    start_parent_process_monitor(args.parent_pid)  # raises SIGINT here once the SuperNode is gone
    try:
        secret = read_secret(args.superexec_auth_secret_file)
        fast = args.pace == "fast"
        gate = Gate(args.runtime_api_address, args.state_dir, args.name, args.allow_any_bundle, secret,
                    warm=fast, model_dir=args.model_dir, model_sha256=args.model_sha256)
        gate.serve(Backoff() if fast else None)
    except KeyboardInterrupt:
        pass
    except SettingError as exc:
        say(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
