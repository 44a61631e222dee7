"""One federated round on the institution's data, behind the ClientApp in client/app.py.

The institution loads the global trainable weights, checks the round against its privacy ledger,
runs the DP-SGD steps that fit on cached features, records the release, and replies with its new
weights and an account of what it released.

The privacy budget belongs to the institution, not to the job: in deployment it comes from the
operator's node config (`budget-epsilon`, `budget-delta`, `accountant`), and every job on the
same data set draws from it. A simulated institution takes the job's privacy settings as its budget.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.ledger import LEDGER_FILE, Budget, BudgetExhausted, PrivacyLedger
from client.local_data import LocalData, load_local_data
from client.trainer import train_dp
from common import messages as m
from common.accounting import NoisePlan, compact, epsilon, plan_noise
from common.config import RUN_CONFIG_KEY, JobConfig, ModelConfig
from common.model import (
    UpperStack,
    build_model,
    default_cache_dir,
    encode,
    from_ndarrays,
    load_trainable_state,
    pick_device,
    to_ndarrays,
    trainable_state,
)
from common.progress import emit

STATE_DIR_ENV = "FEDTUNE_STATE_DIR"
# A job is declined outright when less than this share of the budget is left: the noise needed
# to fit in it would make the update worthless, yet it would still cost the rest of the budget.
MIN_GRANT = 0.02


class RoundOver(RuntimeError):
    """The coordinator has stopped waiting for this round: its reply would be dropped unread."""


def check_deadline(msg: Message, name: str, server_round: int) -> None:
    """Decline a round whose reply deadline has passed, so that no budget pays for an update nobody reads.

    The deadline is the instruction's time to live, the coordinator's reply timeout: Flower's
    SuperLink drops replies after it too. A late instruction reaches a ClientApp that Flower
    relaunched after a crash, or a node that was busy with another job.
    """
    late = time.time() - (msg.metadata.created_at + msg.metadata.ttl)
    if late > 0:
        raise RoundOver(
            f"{m.DECLINED}[{name}]: round {server_round} declined: its reply deadline passed {late:.0f} s ago; "
            "nothing was released"
        )


def train_round(msg: Message, context: Context) -> Message:
    """One round on this institution's data: ledger check, DP-SGD steps that fit, release, reply."""
    job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
    node = dict(context.node_config)
    if job.training.threads:
        torch.set_num_threads(job.training.threads)
    instruction = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = int(instruction.config[m.SERVER_ROUND])
    job_id = str(msg.metadata.run_id)
    local = load_local_data(job, node)
    check_deadline(msg, local.name, server_round)
    ledger = PrivacyLedger(state_dir(node, local.name) / LEDGER_FILE)
    budget = institution_budget(node, job, local)
    ledger.set_budget(local.fingerprint, budget)
    plan = ledger.plan(local.fingerprint, job_id) or ledger.save_plan(
        local.fingerprint, job_id, _plan_job(job, local, ledger, budget)
    )
    steps, dataset_epsilon = ledger.steps_that_fit(
        local.fingerprint, plan.noise_multiplier, plan.sample_rate, plan.steps_per_round
    )
    if steps == 0:
        raise BudgetExhausted(
            f"{m.DECLINED}[{local.name}]: round {server_round} declined: data set budget epsilon {budget.epsilon:g} "
            f"is spent ({ledger.spent(local.fingerprint):.3f} at delta {budget.delta:g})"
        )

    model, features = _prepared(
        job.model.model_dump_json(), tuple(job.data.labels), str(node.get("device", job.training.device)), local,
        str(node.get("cache-dir", default_cache_dir())),
    )
    names = list(trainable_state(model))
    load_trainable_state(model, from_ndarrays(names, parameters_to_ndarrays(instruction.parameters)))
    history = ledger.history(local.fingerprint)
    entry = ledger.reserve(
        local.fingerprint, job_id, server_round, steps, plan.sample_rate, plan.noise_multiplier, job.privacy.max_grad_norm
    )
    started = time.perf_counter()
    result = train_dp(
        UpperStack(model, job.model),
        features,
        local.labels,
        plan,
        steps=steps,
        max_grad_norm=job.privacy.max_grad_norm,
        learning_rate=job.training.learning_rate,
        adapter_learning_rate=job.training.adapter_learning_rate,
        accountant=budget.accountant,
        history=history,
        proximal_mu=float(instruction.config.get(m.PROXIMAL_MU, 0.0)),
        on_step=lambda step, total, loss: emit(
            round=server_round, institution=local.name, step=step, steps=total, loss=loss
        ),
    )
    released = (plan.noise_multiplier, plan.sample_rate, steps)
    if result.history != compact([*history, released]):
        raise RuntimeError("Opacus accounted for other steps than the ledger reserved; nothing is sent")
    job_history = [*ledger.history(local.fingerprint, job_id), released]
    account = {
        m.DATASET_EPSILON: dataset_epsilon,
        m.EPSILON: dataset_epsilon if len(job_history) == len(history) + 1 else epsilon(job_history, budget.delta, budget.accountant),
        m.BUDGET_EPSILON: budget.epsilon,
        m.DELTA: budget.delta,
        m.NOISE_MULTIPLIER: plan.noise_multiplier,
        m.SAMPLE_RATE: plan.sample_rate,
        m.STEPS: steps,
        m.TOTAL_STEPS: sum(entry_steps for _, _, entry_steps in job_history),
        m.MAX_GRAD_NORM: job.privacy.max_grad_norm,
        m.TRAIN_SECONDS: time.perf_counter() - started,
    }
    # Institution-level DP bounds each institution's influence on the average: equal weights.
    weight = min(len(local.records), int(instruction.config[m.MAX_WEIGHT]))
    if KEY_CLIPPING_NORM in instruction.config:
        weight = 1
    reply = FitRes(
        status=Status(Code.OK, "trained"),
        parameters=ndarrays_to_parameters(to_ndarrays(trainable_state(model))),
        num_examples=weight,
        metrics={
            m.INSTITUTION: local.name,
            m.ACCOUNTANT: budget.accountant,
            m.RECORDS: len(local.records),
            m.TRAIN_LOSS: result.mean_loss,
            **account,
        },
    )
    check_deadline(msg, local.name, server_round)  # training took past it: the entry stays pending, uncounted
    ledger.release(entry)  # last thing before the update leaves: see client/ledger.py
    return Message(compat.fitres_to_recorddict(reply, keep_input=True), reply_to=msg)


def state_dir(node_config: dict, name: str) -> Path:
    """Where the institution keeps its ledger: its operator's state dir, or the simulation's."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"]))
    base = os.environ.get(STATE_DIR_ENV)
    if not base:
        raise RuntimeError(f"no state-dir in the node config and {STATE_DIR_ENV} unset: nowhere to keep the ledger")
    return Path(base) / name


def institution_budget(node_config: dict, job: JobConfig, local: LocalData) -> Budget:
    return Budget(
        epsilon=float(node_config.get("budget-epsilon", job.privacy.target_epsilon)),
        delta=float(node_config.get("budget-delta", job.privacy.delta)),
        accountant=str(node_config.get("accountant", job.privacy.accountant)),
        source=str(local.records.source),
    )


def _plan_job(job: JobConfig, local: LocalData, ledger: PrivacyLedger, budget: Budget) -> NoisePlan:
    """Noise for all of this job's rounds, so that the data set ends within its budget.

    The job may ask for `target_epsilon` more; the institution grants at most what is left.
    """
    spent_history = ledger.history(local.fingerprint)
    spent = ledger.spent(local.fingerprint)
    if budget.epsilon - spent < MIN_GRANT * budget.epsilon:
        raise BudgetExhausted(
            f"{m.DECLINED}[{local.name}]: job declined: data set budget epsilon {budget.epsilon:g} is spent "
            f"({spent:.3f} at delta {budget.delta:g})"
        )
    try:
        return plan_noise(
            records=len(local.records),
            batch_size=job.training.batch_size,
            local_epochs=job.training.local_epochs,
            rounds=job.federation.rounds,
            target_epsilon=min(budget.epsilon, spent + job.privacy.target_epsilon),
            delta=budget.delta,
            accountant=budget.accountant,
            spent=spent_history,
        )
    except ValueError as exc:  # what is left of the budget cannot pay for even the noisiest plan
        raise BudgetExhausted(f"{m.DECLINED}[{local.name}]: job declined: {exc} (spent {spent:.3f})") from None


@functools.lru_cache(maxsize=4)
def _prepared(model_json: str, labels: tuple[str, ...], device: str, local: LocalData, cache_dir: str):
    """The institution's model and cached features, kept for the next round in this process.

    Reusing the model is safe: every round overwrites all its trainable weights with the
    global ones, and its frozen weights never change.
    """
    config = ModelConfig.model_validate_json(model_json)
    model = build_model(config, list(labels), pick_device(device))
    return model, encode(model, config, local.records.texts, Path(cache_dir))

