"""Which torch device a party trains on."""

from __future__ import annotations

import torch

from common.model_files import ModelError


def pick_device(requested: str) -> torch.device:
    """'auto' takes the first CUDA device when one is present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ModelError(f"device {requested!r}: not a torch device ('auto', 'cpu', 'cuda' or 'cuda:N')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {requested!r} asked for, but only {torch.cuda.device_count()} CUDA devices exist")
    return device
