"""Local DP-SGD on an institution's cached features, with Opacus.

Poisson sampling, per-record clipping and Gaussian noise come from Opacus' PrivacyEngine; its
accountant is restored from the institution's ledger (Opacus' `state_dict`, which carries the
history and the mechanism) so that it keeps counting across rounds and jobs instead of starting afresh.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import HistoryEntry, NoisePlan, compact
from common.models.features import Features

StepCallback = Callable[[int, int, float], None]


@dataclass
class LocalResult:
    history: list[HistoryEntry]
    mean_loss: float
    #: Adam's per-weight state (moments, step count) after the steps, as `torch.optim.Adam.state_dict()["state"]`.
    adam_state: dict


def _secret_generator(device: torch.device) -> torch.Generator:
    """Sampling and noise must be unpredictable to everyone else, the coordinator included:
    a seed derived from job settings would let it subtract the noise. So never seed from config."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def _physical_batches(loader: DataLoader, optimizer, physical_batch: int | None) -> Iterator:
    """Forever: (rows, labels) batches. With `physical_batch`, Opacus' BatchMemoryManager splits each
    Poisson-sampled logical batch into pieces of at most that many records; the optimizer then
    accumulates their clipped gradients and steps (noise, accounting) once per logical batch, so
    the privacy analysis is the logical batch's."""
    if physical_batch is None:
        while True:
            yield from loader
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical_batch, optimizer=optimizer) as pieces:
        while True:
            yield from pieces


def train_dp(
    upper: nn.Module,
    features: Features,
    labels: torch.Tensor,
    plan: NoisePlan,
    *,
    steps: int,
    max_grad_norm: float,
    learning_rate: float,
    adapter_learning_rate: float,
    accountant: IAccountant,
    adam_state: dict | None = None,
    proximal_mu: float = 0.0,
    on_step: StepCallback | None = None,
    grad_sample_mode: str = "hooks",
    physical_batch: int | None = None,
    autocast: str = "off",
    gradient_checkpointing: bool = False,
) -> LocalResult:
    """Run `steps` DP-SGD steps of `plan`'s mechanism; return the accountant's history after them.

    `upper(*features.batch(rows), labels[rows])` gives each record's loss (its kind's UpperStack):
    Opacus clips each record's gradient of it. `grad_sample_mode`: Opacus' 'hooks' (per-record
    gradients) or 'ghost' (per-record gradient norms only, two backward passes).
    `gradient_checkpointing`: `upper.checkpointed` (a decoder's UpperStack) while training.
    `adam_state`: a `LocalResult.adam_state` of the same trainable weights to go on from (else a fresh Adam);
    the learning rates are this call's.
    """
    device = next(upper.parameters()).device
    generator = _secret_generator(torch.device("cpu"))
    dataset = TensorDataset(torch.arange(len(features)), labels)
    loader = DataLoader(dataset, batch_size=plan.batch_size, generator=generator)
    params = [p for p in upper.parameters() if p.requires_grad]
    anchors = {id(p): p.detach().clone() for p in params} if proximal_mu > 0 else {}
    head = {id(p) for p in getattr(upper.model, "head", nn.Identity()).parameters()}
    groups = [
        {"params": [p for p in params if id(p) in head], "lr": learning_rate},
        {"params": [p for p in params if id(p) not in head], "lr": adapter_learning_rate},
    ]
    adam = torch.optim.Adam([group for group in groups if group["params"]])
    if adam_state is not None:
        adam.load_state_dict({"state": adam_state, "param_groups": adam.state_dict()["param_groups"]})
    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant.load_state_dict(accountant.state_dict())
    private = engine.make_private(
        module=upper,
        optimizer=adam,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=_secret_generator(device),
        grad_sample_mode=grad_sample_mode,
        **({"criterion": nn.CrossEntropyLoss()} if grad_sample_mode == "ghost" else {}),
    )
    module, optimizer, loader = private[0], private[1], private[-1]  # ghost also returns a criterion: unused
    if loader.sample_rate != plan.sample_rate:
        raise RuntimeError(f"Opacus samples at {loader.sample_rate}, the plan at {plan.sample_rate}")
    module.train()
    losses: list[float] = []
    batches = _physical_batches(loader, optimizer, physical_batch)
    stack = contextlib.ExitStack()
    if gradient_checkpointing:
        stack.enter_context(upper.checkpointed(HooksPaused(module)))
    try:
        for step in range(1, steps + 1):
            loss_sum, records = 0.0, 0
            while True:  # the physical batches of one logical batch
                rows, target = next(batches)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, autocast):  # the forward only, as torch recommends
                    per_record = module(*features.batch(rows, device), target.to(device)).float()
                _backward(module, optimizer, per_record, grad_sample_mode)
                optimizer.step()
                loss_sum, records = loss_sum + float(per_record.detach().sum()), records + len(target)
                if not optimizer._is_last_step_skipped:
                    break
            if anchors:
                # FedProx' proximal pull towards the global model. It does not depend on the
                # data, so it is applied after the private step and costs no privacy.
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.sub_(group["lr"] * proximal_mu * (p - anchors[id(p)]))
            if records:
                losses.append(loss_sum / records)
            if on_step is not None:
                on_step(step, steps, losses[-1] if losses else float("nan"))
    finally:
        stack.close()
        module._close()
    return LocalResult(
        history=compact(engine.accountant.history),
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        adam_state=adam.state_dict()["state"],
    )


class HooksPaused:
    """Opacus' hooks off while a checkpointed layer is recomputed in the backward pass: they would
    capture each adapter's input a second time, and Opacus would pair the wrong inputs with the
    backward's gradients (and never complete a per-record gradient). Reusable: entered at every
    recomputation."""

    def __init__(self, module):
        self.module, self.enabled = module, True

    def __enter__(self) -> None:
        self.enabled, self.module.hooks_enabled = self.module.hooks_enabled, False

    def __exit__(self, *exc) -> None:
        self.module.hooks_enabled = self.enabled


def _autocast(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def _backward(module: nn.Module, optimizer, per_record: torch.Tensor, grad_sample_mode: str) -> None:
    """The mean loss's backward; an empty Poisson batch contributes zero gradients (and its noise)."""
    if grad_sample_mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        DPTensorFastGradientClipping(module, optimizer, per_record, "mean").backward()
    else:
        (per_record.mean() if len(per_record) else per_record.sum()).backward()
