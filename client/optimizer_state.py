"""Adam's moments, kept between an institution's rounds of one job.

A round used to start a fresh Adam, whose first step moves every weight by the full learning rate in
the sign of its noisy gradient; carried over, the moments average the noise of the job's earlier steps
(BENCHMARKS.md, "Adam's moments across rounds"). They are computed from the noised gradients only, so
keeping them is post-processing of what the accountant already counts, and costs no privacy, with
one condition that client/round.py keeps: a round's state is saved only after its release, since a
round that was never released (its entry stays pending, uncounted) must not reach the next update
through them. Like the institution's own update, they never leave it: one 0600 file per
(data set, job) in `optimizer/` of its state dir.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from client.app import local_log
from common.processes import private_dir, write_private

OPTIMIZER_DIR = "optimizer"

#: The trainable weights the state belongs to, as (name, shape) pairs in the model's order.
Weights = list[tuple[str, tuple[int, ...]]]


def state_file(state_dir: Path, dataset: str, job_id: str) -> Path:
    """The file of one data set's state in one job: named by a digest, since both names come from outside."""
    digest = hashlib.sha256(json.dumps([dataset, job_id]).encode()).hexdigest()[:32]
    return Path(state_dir) / OPTIMIZER_DIR / f"{digest}.pt"


def weights_of(trainable: dict[str, torch.Tensor]) -> Weights:
    return [(name, tuple(tensor.shape)) for name, tensor in trainable.items()]


def load(path: Path, weights: Weights) -> dict | None:
    """The state saved for exactly these weights, or None: a fresh Adam (first round, other weights, unreadable)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        saved_weights, state = [(name, tuple(shape)) for name, shape in saved["weights"]], dict(saved["state"])
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - any unreadable file means the same: start afresh
        local_log(f"{path}: unreadable Adam state, this round starts a fresh Adam")
        return None
    if saved_weights != weights:
        local_log(f"{path}: Adam state of other trainable weights, this round starts a fresh Adam")
        return None
    return state


def save(path: Path, weights: Weights, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save({"weights": [(name, list(shape)) for name, shape in weights], "state": state}, buffer)
    private_dir(path.parent)
    write_private(path, buffer.getvalue())
