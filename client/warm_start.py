"""ClientApp processes started warm: forked from a bundle gate that imported the training libraries once.

Flower starts a fresh `flwr-clientapp` process for every message, and the one that trains spends
seconds importing torch, transformers, peft and Opacus before it reads a record (BENCHMARKS.md),
every round. `WarmExecutor` imports them once, in the gate, in the background (with the code of the
node's pinned model, which transformers would import lazily in each process, and the model itself,
which each training message then takes instead of loading it: common/models/loading.py), and starts each
ClientApp as a fork of the gate that runs Flower's own `flwr-clientapp` entry point with the
command line it would have had (and shows it, common/proctitle.py). Each message still gets its own
process, a child of the gate as before (its token file, its exit report, its process group unchanged).

What a fork must not inherit is fedtune's own code: the gate imported it from this installation,
and a ClientApp runs only the app bundle its operator approved (client/gate.py). So the child
forgets every fedtune module (`FEDTUNE_PACKAGES`) before Flower installs and imports the bundle,
exactly as a fresh process would; only third-party libraries stay loaded. Until the background
import has finished (and for `pace = "flower"`), ClientApps start cold, as Flower starts them.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from common.flower_patch import reuse_installed_bundles, shorten_object_pulls
from common.models.kinds import KINDS
from common.processes import flower_executable
from common.proctitle import set_command_line
from common.superexec import TokenFileExecutor

FEDTUNE_PACKAGES = frozenset({"client", "common", "server", "simulations"})
# Flower's ClientApp entry point, what the training message imports at module level, and each
# model kind (peft, transformers' model classes): the third-party libraries these pull in stay loaded.
PRELOAD = ("flwr.supernode.cli", "client.round", *KINDS.values())


def forget_fedtune_modules() -> None:
    """Drop fedtune's modules, so that the next import of one reads it from the bundle."""
    for name in [name for name in sys.modules if name.partition(".")[0] in FEDTUNE_PACKAGES]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _preload(model_dir: Path | None, model_sha256: str | None) -> None:
    try:
        for name in PRELOAD:
            importlib.import_module(name)
        if model_dir is not None:
            # pylint: disable-next=import-outside-toplevel
            from common.models.loading import import_model_code, preload_model

            import_model_code(str(model_dir))
            if model_sha256 is not None:
                try:
                    reason = preload_model(model_dir, model_sha256)
                except Exception as exc:  # noqa: BLE001 - the ClientApps load it themselves, and say why if they fail
                    reason = f"preloading it failed: {type(exc).__name__}: {exc}"
                if reason is not None:
                    print(f"fedtune-client: bundle gate: each training message loads the model: {reason}",
                          file=sys.stderr, flush=True)
        for patch, without in ((shorten_object_pulls, "retry a message's parts at Flower's pace"),
                               (reuse_installed_bundles, "unzip and verify the bundle for every message")):
            if (reason := patch()) is not None:  # the forks inherit the patch
                print(f"fedtune-client: bundle gate: ClientApps {without}: {reason}", file=sys.stderr, flush=True)
        # What is loaded now lives as long as the gate: out of the collector's sight, so that a
        # child's collections never write to (and so copy) the pages it shares with the gate.
        gc.collect()
        gc.freeze()
    except Exception:  # noqa: BLE001 - ClientApps then start cold; the reason goes to the node's log
        print(f"fedtune-client: bundle gate: ClientApps start cold: preloading failed:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)


class WarmExecutor(TokenFileExecutor):
    """A TokenFileExecutor that forks each ClientApp from this (preloaded) process once it can."""

    def __init__(self, token_dir: Path, model_dir: Path | None = None, model_sha256: str | None = None):
        super().__init__(token_dir)
        self.loader = threading.Thread(target=_preload, args=(model_dir, model_sha256), name="preload", daemon=True)
        self.loader.start()

    def start(self, args: list[str], quiet: bool) -> int:
        # A fork while another thread is importing would inherit its held import locks: cold until done.
        if self.loader.is_alive() or not set(PRELOAD) <= set(sys.modules):
            return super().start(args, quiet)
        pid = os.fork()
        if pid == 0:
            _run_in_child(args, quiet)  # never returns
        return pid


def _run_in_child(args: list[str], quiet: bool) -> None:
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        forget_fedtune_modules()
        # As for the console script: the script's folder first, not the gate's working directory.
        sys.path[0] = str(Path(flower_executable(args[0])).parent)
        sys.argv = list(args)
        set_command_line(sys.argv)  # `ps` shows flwr-clientapp and its arguments, as for a cold start
        from flwr.supernode.cli import flwr_clientapp  # pylint: disable=import-outside-toplevel

        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a child must never return into the gate's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
