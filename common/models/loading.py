"""Model folders and their tokenizers, loaded once per process; a deployed node's model, once per node.

A bundle gate (client/gate.py) loads its node's pinned model once, before it forks any ClientApp
(`preload_model`); the ClientApp that builds the model takes that copy (`take_loaded`) instead of
loading the folder again, every training message. The copy is kept in a `sys.modules` entry outside
fedtune's packages (`LOADED`): a warm fork forgets fedtune's own modules, not third-party objects
(client/warm_start.py). It was loaded by the gate's (installed) fedtune, so it is kept under the digest
of the model kind's source as well, and a ClientApp takes it only if its approved bundle's kind module
is that same code: a bundle that loads models otherwise loads its own.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
from pathlib import Path
from types import ModuleType

from transformers import AutoConfig, AutoTokenizer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from common.config import ModelConfig
from common.model_files import default_model_path, model_digest
from common.models.kinds import KINDS, task_of_folder

LOADED = "fedtune_loaded_models"


def model_path(config: ModelConfig) -> str:
    return config.path or default_model_path(config.task)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def import_model_code(path: str) -> None:
    """Import the transformers module of the model in `path` (e.g. `modeling_bert`), which
    transformers otherwise imports lazily, seconds into the first model load of a process, and
    build transformers' table of checkpoint renamings, which the first `from_pretrained` of a
    process builds (thousands of regular expressions: 0.1-0.6 s of every training message)."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    get_checkpoint_conversion_mapping(config.model_type)  # cached in transformers for the process


def _key(task: str, folder: str, sha256: str | None) -> tuple:
    """What a preloaded model is kept under: the task, the folder, its pinned digest (None outside a
    deployment, where nothing is preloaded) and the digest of the code of the kind that loaded it."""
    code = hashlib.sha256(Path(importlib.import_module(KINDS[task]).__file__).read_bytes()).hexdigest()
    return task, folder, sha256, code


def take_loaded(config: ModelConfig):
    """The model the gate loaded for this config, once per process (a second build loads its own); or None."""
    holder = sys.modules.get(LOADED)
    return None if holder is None else holder.models.pop(_key(config.task, model_path(config), config.sha256), None)


def preload_model(folder: Path, sha256: str) -> str | None:
    """Load the node's pinned model for the ClientApps forked from this process; why not, or None.

    Digested before and after loading, the second time from the bytes whatever the per-process
    digest cache says. The weights may stay memory-mapped: a file overwritten in place afterwards
    changes them, as it would those of a model each message loads itself; each training message
    digests the folder again and refuses one that changed (client/round.py `pinned_model`)."""
    if model_digest(folder) != sha256:
        return f"{folder} is not the pinned model (sha256 {sha256})"
    task = task_of_folder(str(folder))
    model = importlib.import_module(KINDS[task]).load_pretrained(str(folder))
    if model_digest(folder, fresh=True) != sha256:
        return f"{folder} changed while it was loaded"
    holder = sys.modules.setdefault(LOADED, ModuleType(LOADED))
    holder.models = {_key(task, str(folder), sha256): model}
    return None
