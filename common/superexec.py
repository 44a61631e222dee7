"""fedtune's SuperExec: claims app tasks on a Flower Runtime API and starts their processes.

In `--isolation process`, a SuperLink or SuperNode starts no app process itself: it queues a task
per run (SuperLink) or per message (SuperNode), and a SuperExec claims it on the local Runtime
API (`AcquireTask`) and starts `flwr-serverapp` / `flwr-clientapp` with the task's token. Two
doors stay open with Flower's own `flower-superexec` on a machine other people log into:

- Without `--superexec-auth-secret-file` on both sides, any local process may claim a task, and
  with its token act as the app (push instructions, pull replies, answer a message).
- Flower's launcher passes the token on the command line (`flwr-clientapp --token T`), which
  every local user can read (`ps`, /proc/PID/cmdline).

So the coordinator's SuperExec (`python -m common.superexec`, started by server/superlink.py)
and the node's bundle gate (client/gate.py) sign their claims with the secret, as Flower's does
(Flower's own interceptor, for the same three methods), and hand each app its token in an
owner-only file (`--token-file`), deleted once the app has ended.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.interceptors.http import SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor
from flwr.supercore.superexec.plugin import AutoExecPlugin

from common.processes import SUPEREXEC_SECRET, SettingError, private_dir

POLL_SECONDS = 1.0  # flower-superexec's default
SECRET_FILE = SUPEREXEC_SECRET  # in the state folder, beside the SuperLink's or SuperNode's other state
TOKEN_DIR = "tasks"  # in the state folder: one token file per running app process
# The Runtime API methods a SuperLink/SuperNode started with the secret accepts only signed
# (flwr/supercore/routers/runtime/router.py); every other method takes the task's token.
SIGNED_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask", "/flwr.proto.Runtime/PullPendingTasks",
                            "/flwr.proto.Runtime/ClaimTask"})


def read_secret(path: Path) -> bytes:
    """The secret, read as Flower reads it (raw bytes), refusing a file other users could read."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"{path}: no SuperExec auth secret here (the daemon writes it at start)")
    if path.stat().st_mode & 0o077:
        raise SettingError(f"{path}: readable by other users; it must be mode 0600")
    secret = load_superexec_auth_secret(str(path))
    assert secret is not None
    return secret


def runtime_client(address: str, secret: bytes | None = None, root_certificates: Path | None = None,
                   component: str = "SuperExec", retry: bool = True) -> RuntimeHttpClient:
    """A client of a Runtime API: HTTPS checked against `root_certificates` (the SuperLink's), or
    plain HTTP on loopback when None (the SuperNode's). With `secret`, task claims are signed."""
    interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SIGNED_METHODS))
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else str(root_certificates),
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


class TokenFileExecutor(SubprocessExecutor):
    """Flower's SubprocessExecutor, with the task token in a 0600 file instead of on the command line."""

    def __init__(self, token_dir: Path):
        self.token_dir = private_dir(token_dir)
        for stale in self.token_dir.glob("*.token"):  # of apps that died with an earlier SuperExec
            stale.unlink(missing_ok=True)
        self.tokens: dict[int, Path] = {}

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        self.sweep()
        fd, token_file = tempfile.mkstemp(dir=self.token_dir, prefix="task-", suffix=".token")  # 0600
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(spec.token)
        args = [TASK_TYPE_TO_COMMAND[spec.task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type],
                spec.runtime_api_address, "--token-file", token_file]
        if spec.insecure:
            args.append("--insecure")
        elif spec.root_certificates_path is not None:
            args += ["--root-certificates", spec.root_certificates_path]
        if spec.parent_pid is not None:
            args += ["--parent-pid", str(spec.parent_pid)]
        if spec.runtime_dependency_install:
            args.append("--allow-runtime-dependency-installation")
        self.tokens[self.start(args, spec.suppress_output)] = Path(token_file)
        return LaunchResult.accepted()

    def start(self, args: list[str], quiet: bool) -> int:
        """Start the app process `args` describe; its pid."""
        streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if quiet else {}
        return subprocess.Popen(args, **streams).pid  # pylint: disable=consider-using-with

    def sweep(self) -> None:
        """Delete the token files of app processes that have ended. Reaps nothing (WNOWAIT): the
        gate's report_exits must still see how each one ended."""
        for pid, token_file in list(self.tokens.items()):
            try:
                running = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            except ChildProcessError:  # already reaped
                running = False
            if not running:
                token_file.unlink(missing_ok=True)
                del self.tokens[pid]

    def close(self) -> None:
        for token_file in self.tokens.values():
            token_file.unlink(missing_ok=True)
        self.tokens.clear()


def reap_children() -> None:
    """Collect app processes that ended, so none lingers as a zombie until the next launch."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(address: str, secret: bytes, root_certificates: Path | None, token_dir: Path, task_type: TaskType) -> None:
    """Claim `task_type` tasks on the Runtime API at `address` and start each one's app, forever."""
    executor = TokenFileExecutor(token_dir)
    launcher = AutoExecPlugin(runtime_api_address=address, insecure=root_certificates is None,
                              root_certificates_path=None if root_certificates is None else str(root_certificates),
                              executor=executor)
    client = runtime_client(address, secret, root_certificates)
    request = AcquireTaskRequest(supported_task_types=[task_type])
    try:
        while True:
            executor.sweep()
            reap_children()
            answer = client.AcquireTask(request)
            if answer.HasField("task") and answer.token:
                launcher.launch_task(token=answer.token, task=answer.task)
            time.sleep(POLL_SECONDS)
    finally:
        executor.close()
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.superexec", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT", help="the SuperLink's Runtime API")
    parser.add_argument("--root-certificates", type=Path, metavar="CA.pem",
                        help="CA of the SuperLink's TLS certificate (none: a SuperLink started with --insecure)")
    parser.add_argument("--superexec-auth-secret-file", type=Path, required=True, metavar="FILE",
                        help="the secret the SuperLink was started with (0600)")
    parser.add_argument("--token-dir", type=Path, required=True, metavar="DIR", help="folder for the apps' token files")
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperLink's pid; this process ends with it")
    args = parser.parse_args(argv)
    start_parent_process_monitor(args.parent_pid)  # raises SIGINT here once the SuperLink is gone
    try:
        serve(args.runtime_api_address, read_secret(args.superexec_auth_secret_file), args.root_certificates,
              args.token_dir, TaskType.SERVER_APP)
    except KeyboardInterrupt:
        pass
    except SettingError as exc:
        print(f"fedtune-server: SuperExec: error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
