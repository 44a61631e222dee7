"""The federated strategy: one of Flower's Message API strategies, plus a record of each round.

Flower's strategies aggregate metrics across institutions; a privacy report needs them per
institution. `with_round_log` subclasses the chosen strategy to keep what each institution
reported and how many bytes went each way, and to stop the job when an institution fails
instead of silently averaging the survivors.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common import messages as m
from common.config import JobConfig


DECLINED_REASON = re.compile(re.escape(m.DECLINED) + r"\[([^\]]+)\]: ([^'\n]*)")


class InstitutionFailed(RuntimeError):
    """An institution replied with an error; the job stops with its reason."""


@dataclass
class RoundLog:
    """Per round: what each institution reported, keyed by institution name."""

    replies: dict[int, dict[str, dict]] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    declined: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> institution -> reason

    def add(self, server_round: int, institution: str, metrics: dict, bytes_up: int) -> None:
        entry = dict(metrics, bytes_up=bytes_up, bytes_down=self.bytes_down.get(server_round, 0))
        self.replies.setdefault(server_round, {})[institution] = entry


def _with_round_log(base: type[Strategy]) -> type[Strategy]:
    class Logged(base):  # type: ignore[misc, valid-type]
        round_log: RoundLog

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> Iterable[Message]:
            self.round_log.bytes_down[server_round] = arrays.count_bytes()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round: int, replies: Iterable[Message]):
            trained = []
            for reply in replies:
                if reply.has_error():
                    self._declined_or_fail(server_round, reply.error.reason)
                    continue
                info = reply.content.config_records[m.INFO]
                metrics = dict(reply.content.metric_records["metrics"], accountant=str(info[m.ACCOUNTANT]))
                bytes_up = reply.content.array_records["arrays"].count_bytes()
                self.round_log.add(server_round, str(info[m.INSTITUTION]), metrics, bytes_up)
                trained.append(reply)
            return super().aggregate_train(server_round, trained)

        def _declined_or_fail(self, server_round: int, reason: str) -> None:
            declined = DECLINED_REASON.search(reason)
            if declined is None:
                raise InstitutionFailed(f"round {server_round}: an institution failed: {reason}")
            name, why = declined.groups()
            log(WARNING, "round %s: %s declined: %s", server_round, name, why)
            self.round_log.declined.setdefault(server_round, {})[name] = why

    Logged.__name__ = Logged.__qualname__ = base.__name__
    return Logged


STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": _with_round_log(FedAvg),
    "fedprox": _with_round_log(FedProx),
    "fedadam": _with_round_log(FedAdam),
}


def make_strategy(job: JobConfig, round_log: RoundLog) -> Strategy:
    """Every institution trains in every round; the coordinator evaluates centrally."""
    fed = job.federation
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=fed.institutions,
        min_evaluate_nodes=0,
        min_available_nodes=fed.institutions,
    )
    extra = {
        "fedavg": {},
        "fedprox": {"proximal_mu": fed.proximal_mu},
        "fedadam": {"eta": fed.server_learning_rate, "eta_l": job.training.learning_rate},
    }[fed.strategy]
    strategy = STRATEGIES[fed.strategy](**common, **extra)
    strategy.round_log = round_log
    return strategy
