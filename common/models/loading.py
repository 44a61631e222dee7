"""Model folders and their tokenizers, loaded once per process."""

from __future__ import annotations

import functools

from transformers import AutoTokenizer

from common.config import ModelConfig
from common.model_files import default_model_path


def model_path(config: ModelConfig) -> str:
    return config.path or default_model_path(config.task)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
