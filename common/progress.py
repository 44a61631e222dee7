"""Step-by-step progress events, written by institutions and shown by whoever runs the job.

Institutions append one JSON line per event to the file named by `FEDTUNE_PROGRESS_FILE`
(set by the simulation runner, or by an institution operator who wants a local log). Lines
carry only counters and the training loss, never a record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

ENV_VAR = "FEDTUNE_PROGRESS_FILE"


def emit(**event: object) -> None:
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps(event) + "\n"
    # One write() of a short line to an O_APPEND file lands whole, even with many writers.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # losses per step: owner only
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Follower:
    """Reads the events appended to a progress file since the last call."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def new_events(self) -> Iterator[dict]:
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            yield json.loads(line)
