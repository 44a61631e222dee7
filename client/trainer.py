"""Local DP-SGD on an institution's cached features, with Opacus.

Poisson sampling, per-record clipping and Gaussian noise come from Opacus' PrivacyEngine; its
accountant is restored from the institution's ledger (Opacus' `state_dict`, which carries the
history and the mechanism) so that it keeps counting across rounds and jobs instead of starting afresh.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.accounting import HistoryEntry, NoisePlan, compact
from common.model import Features, UpperStack

StepCallback = Callable[[int, int, float], None]


@dataclass
class LocalResult:
    history: list[HistoryEntry]
    mean_loss: float


def _secret_generator(device: torch.device) -> torch.Generator:
    """Sampling and noise must be unpredictable to everyone else, the coordinator included:
    a seed derived from job settings would let it subtract the noise. So never seed from config."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def _batches(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def train_dp(
    upper: UpperStack,
    features: Features,
    labels: torch.Tensor,
    plan: NoisePlan,
    *,
    steps: int,
    max_grad_norm: float,
    learning_rate: float,
    adapter_learning_rate: float,
    accountant: IAccountant,
    proximal_mu: float = 0.0,
    on_step: StepCallback | None = None,
) -> LocalResult:
    """Run `steps` DP-SGD steps of `plan`'s mechanism; return the accountant's history after them."""
    device = next(upper.parameters()).device
    generator = _secret_generator(torch.device("cpu"))
    dataset = TensorDataset(torch.arange(len(features)), labels)
    loader = DataLoader(dataset, batch_size=plan.batch_size, generator=generator)
    params = [p for p in upper.parameters() if p.requires_grad]
    anchors = {id(p): p.detach().clone() for p in params} if proximal_mu > 0 else {}
    head = {id(p) for p in upper.model.head.parameters()}
    optimizer = torch.optim.Adam(
        [
            {"params": [p for p in params if id(p) in head], "lr": learning_rate},
            {"params": [p for p in params if id(p) not in head], "lr": adapter_learning_rate},
        ]
    )
    engine = PrivacyEngine(accountant=accountant.mechanism())
    engine.accountant.load_state_dict(accountant.state_dict())
    module, optimizer, loader = engine.make_private(
        module=upper,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        noise_generator=_secret_generator(device),
    )
    if loader.sample_rate != plan.sample_rate:
        raise RuntimeError(f"Opacus samples at {loader.sample_rate}, the plan at {plan.sample_rate}")
    module.train()
    losses: list[float] = []
    batches = _batches(loader)
    try:
        for step in range(1, steps + 1):
            rows, target = next(batches)
            optimizer.zero_grad(set_to_none=True)
            logits = module(*features.batch(rows, device))
            loss = nn.functional.cross_entropy(logits, target.to(device))
            loss.backward()
            optimizer.step()
            if anchors:
                # FedProx' proximal pull towards the global model. It does not depend on the
                # data, so it is applied after the private step and costs no privacy.
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group["params"]:
                            p.sub_(group["lr"] * proximal_mu * (p - anchors[id(p)]))
            if len(target):
                losses.append(loss.detach().item())
            if on_step is not None:
                on_step(step, steps, losses[-1] if losses else float("nan"))
    finally:
        module._close()
    return LocalResult(
        history=compact(engine.accountant.history),
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
    )
