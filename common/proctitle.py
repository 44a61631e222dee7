"""A process's command line as `ps` and /proc show it, for processes that start as something else.

The node's SuperNode runs as `python -m client.supernode` and its warm ClientApps as forks of the
bundle gate (client/supernode.py, client/warm_start.py); operators (and the tests, as operators
would) find them by name, `flower-supernode` and `flwr-clientapp`. Linux reads /proc/PID/cmdline
from the process's own memory, between the `arg_start` and `arg_end` addresses in /proc/PID/stat:
writing the new command line there (truncated to the space the original had) is what
`setproctitle` does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def set_command_line(argv: list[str]) -> bool:
    """Show `argv` as this process's command line; False where the system does not allow it."""
    try:
        # Fields after the ")" that closes the command name start at field 3; arg_start/arg_end are 48/49.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return False
    if end - start < 2:
        return False
    text = "\0".join(argv).encode()[: end - start - 1]
    ctypes.memmove(start, text + b"\0" * (end - start - len(text)), end - start)
    return True
