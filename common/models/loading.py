"""Model folders and their tokenizers, loaded once per process."""

from __future__ import annotations

import functools
import importlib

from transformers import AutoConfig, AutoTokenizer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from common.config import ModelConfig
from common.model_files import default_model_path


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
