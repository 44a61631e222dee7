"""Which module implements a job's `model.task`: a new model kind is a new module and a line here.

Each kind module offers the same five things: `build_model(config, labels, device, seed)`,
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
