"""The trainable weights as they travel between parties: whatever requires grad, in model order."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from common.model_files import ModelError


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of the weights that travel (on the CPU, the same tensors would alias the live ones)."""
    return OrderedDict((name, p.detach().cpu().clone()) for name, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelError(f"trainable weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def to_ndarrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The trainable weights as Flower's legacy workflow carries them: a list in the model's order."""
    return [value.float().numpy() for value in state.values()]


def from_ndarrays(names: list[str], arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    if len(names) != len(arrays):
        raise ModelError(f"expected {len(names)} trainable tensors, got {len(arrays)}")
    return OrderedDict((name, torch.from_numpy(np.asarray(array))) for name, array in zip(names, arrays))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
