"""The institution's ClientApp: trains the global model on local records with DP-SGD.

One round = one train instruction (a legacy `FitIns`, see common/messages.py). The institution
loads the global trainable weights, checks the round against its privacy ledger, runs the DP-SGD
steps that fit on cached features, records the release, and replies with its new weights and an
account of what it released. Two Flower mods wrap that: `secaggplus_mod` masks the weights when
the coordinator runs SecAgg+ (it does by default), and `fixedclipping_mod` clips the update when
the job has institution-level DP.

The privacy budget belongs to the institution, not to the job: in deployment it comes from the
operator's node config (`budget-epsilon`, `budget-delta`, `accountant`), and every job on the
same data set draws from it. A simulated institution takes the job's privacy settings as its budget.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
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



def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ for rounds the coordinator runs with it; without it, the round as it comes."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, lambda inner, ctx: _in_float64(call_next(inner, ctx)))
    return call_next(msg, context)


def _in_float64(reply: Message) -> Message:
    """SecAgg+ quantises in the weights' own precision: float32 resolves only ~1e-6 near its
    clipping range, which after weighting is coarser than a round's update."""
    if reply.has_error():
        return reply
    fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
    weights = [array.astype(np.float64) for array in parameters_to_ndarrays(fit_res.parameters)]
    fit_res.parameters = ndarrays_to_parameters(weights)
    reply.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return reply


def institution_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod when the coordinator adds institution-level noise, and a receipt.

    The receipt (the bound, in the reply's metrics) is what lets the coordinator refuse to noise an
    update nobody clipped: Flower's server wrapper cannot tell on its own.
    """
    if msg.metadata.message_type != "train" or KEY_CLIPPING_NORM not in _instruction(msg).config:
        return call_next(msg, context)
    reply = fixedclipping_mod(msg, context, call_next)
    if not reply.has_error():
        bound = float(_instruction(msg).config[KEY_CLIPPING_NORM])
        reply.content.config_records[m.FIT_METRICS][m.CLIPPED_TO] = bound
    return reply


# Order matters (FLOWER_NOTES): SecAgg+ masks what clipping left.
app = ClientApp(mods=[secure_aggregation_mod, institution_clipping_mod])


def _instruction(msg: Message):
    return compat.recorddict_to_fitins(msg.content, keep_input=True)


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
    node = dict(context.node_config)
    if job.training.threads:
        torch.set_num_threads(job.training.threads)
    instruction = _instruction(msg)
    server_round = int(instruction.config[m.SERVER_ROUND])
    job_id = str(msg.metadata.run_id)
    local = load_local_data(job, node)
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

