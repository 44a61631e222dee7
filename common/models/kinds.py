"""Which module implements a job's `model.task`: a new model kind is a new module and a line here.

Each kind module offers the same six things: `load_pretrained(path)` (the transformers model of a folder, which
`build_model` adapts), `build_model(config, labels, device, seed)`,
`encode(model, config, records, cache_dir)` (the frozen part, cached), `UpperStack(model, config)`
(whose forward gives each record's loss on cached features, what DP-SGD clips),
`evaluate(upper, features, labels, records, label_set)` and `samples(model, config, records, count,
labels)` (the final model's outputs for the report).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from common.config import ModelConfig

KINDS = {"classification": "common.models.encoder", "causal_lm": "common.models.decoder"}


def model_kind(config: ModelConfig) -> ModuleType:
    return importlib.import_module(KINDS[config.task])


def task_of_folder(path: str) -> str:
    """The task a model folder is most likely pinned for: `causal_lm` for a decoder (a `...ForCausalLM` or
    `...LMHeadModel` architecture, as GPT-2's), else `classification`. Only what a bundle gate preloads
    depends on it: a wrong guess costs its ClientApps a load, never a wrong model (common/models/loading.py
    keys what it keeps by task)."""
    from transformers import AutoConfig  # pylint: disable=import-outside-toplevel

    architectures = AutoConfig.from_pretrained(path, local_files_only=True).architectures or []
    decoder = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    return "causal_lm" if decoder else "classification"
