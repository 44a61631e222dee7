"""One federated round on the institution's data, behind the ClientApp in client/app.py.

The institution checks the instruction against its own terms, loads the global trainable weights,
asks its privacy state (client/privacy/) what the round may spend, runs the DP-SGD steps that
fit on cached features, records the release, and replies with its new weights and data-free facts
about what it released.

Every refusal raises `messages.Refused`: its reason code crosses to the coordinator, its detail
(which may name a file, a column or a value) only reaches the institution's log.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from pydantic import ValidationError

from client import optimizer_state
from client.app import local_log
from client.local_data import LocalData, load_local_data
from client.privacy.grant import Request, allowance, grant_for
from client.privacy.ledger import LEDGER_FILE, RDP_MEMO_FILE, PrivacyLedger
from client.trainer import train_dp
from common import messages as m
from common.accounting import compact
from common.config import JOB_ID_KEY, JOB_ID_PATTERN, RUN_CONFIG_KEY, JobConfig, ModelConfig, NodeConfig
from common.data import DataError
from common.messages import Reason, Refused
from common.model_files import default_cache_dir, model_digest
from common.models.device import pick_device
from common.models.kinds import model_kind
from common.models.transport import from_ndarrays, load_trainable_state, to_ndarrays, trainable_state
from common.opacus_patch import load_memo, save_memo
from common.progress import emit

STATE_DIR_ENV = "FEDTUNE_STATE_DIR"


def check_deadline(msg: Message, server_round: int) -> None:
    """Decline a round whose reply deadline has passed, so that no budget pays for an update nobody reads.

    The deadline is the instruction's time to live, the coordinator's reply timeout: Flower's
    SuperLink drops replies after it too. A late instruction reaches a ClientApp that Flower
    relaunched after a crash, or a node that was busy with another job.
    """
    late = time.time() - (msg.metadata.created_at + msg.metadata.ttl)
    if late > 0:
        raise Refused(Reason.DEADLINE_PASSED, f"round {server_round}: its reply deadline passed {late:.0f} s ago")


def read_instruction(msg: Message, context: Context) -> tuple[JobConfig, object, int]:
    try:
        job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
        instruction = compat.recorddict_to_fitins(msg.content, keep_input=True)
        server_round = int(instruction.config[m.SERVER_ROUND])
        int(instruction.config[m.MAX_WEIGHT])
    except (KeyError, ValueError, TypeError, ValidationError) as exc:
        raise Refused(Reason.BAD_INSTRUCTION, f"the job or the train instruction is malformed: {exc}") from None
    if job.data.labels is None:
        raise Refused(Reason.BAD_INSTRUCTION, "the job lists no labels")
    return job, instruction, server_round


def job_key(msg: Message, context: Context) -> str:
    """The job's key in the ledger: fedtune's job id, which a resumed job keeps (so it draws on the grant and
    noise plan made for it), or Flower's run id for a job submitted without one. Whatever the coordinator
    names, the job gets at most one grant and spends within it: a reused id only shares that grant."""
    job_id = str(context.run_config.get(JOB_ID_KEY, "") or "")
    if not job_id:
        return str(msg.metadata.run_id)
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise Refused(Reason.BAD_INSTRUCTION, f"job id {job_id[:80]!r} is not of the form job-<16 hex digits>")
    return job_id


def pinned_model(job: JobConfig, node: NodeConfig) -> ModelConfig:
    """The job's model settings with the institution's own model folder, if the digests agree.

    A simulated institution (no `model-dir` in its node config) loads the job's folder, which its
    user chose; a deployed one only ever loads the folder its operator pinned."""
    if node.model_dir is None:
        return job.model
    if not (job.model.sha256 == node.model_sha256 == model_digest(node.model_dir)):
        raise Refused(Reason.MODEL_NOT_PINNED, f"the job's model sha256 {job.model.sha256} is not the pinned "
                                               f"{node.model_dir} (sha256 {node.model_sha256}), or that folder changed")
    return job.model.model_copy(update={"path": str(node.model_dir)})


def train_round(msg: Message, context: Context) -> Message:
    """One round on this institution's data: terms, privacy allowance, DP-SGD steps, release, reply."""
    node = NodeConfig.model_validate(dict(context.node_config))
    job, instruction, server_round = read_instruction(msg, context)
    if job.training.threads:
        torch.set_num_threads(job.training.threads)
    job_id = job_key(msg, context)
    check_deadline(msg, server_round)
    model_config = pinned_model(job, node)
    try:
        local = load_local_data(job, node)
    except DataError as exc:
        raise Refused(Reason.DATA_MISMATCH, str(exc)) from None
    ledger = PrivacyLedger(state_dir(node) / LEDGER_FILE)
    memo = ledger.path.with_name(RDP_MEMO_FILE)
    if (ignored := load_memo(memo)) is not None:
        local_log(ignored)
    dataset = node.dataset_id or local.name
    request = Request.of(job)
    grant = grant_for(ledger, dataset, job_id, request, len(local.records))
    allowed = allowance(ledger, dataset, job_id, grant)
    budget, plan = ledger.dataset(dataset).budget, grant.plan

    model, features = _prepared(
        model_config.model_dump_json(), tuple(job.data.labels), node.device or job.training.device, local,
        str(node.cache_dir or default_cache_dir()),
    )
    trainable = trainable_state(model)
    load_trainable_state(model, from_ndarrays(list(trainable), parameters_to_ndarrays(instruction.parameters)))
    weights = optimizer_state.weights_of(trainable)
    adam_file = optimizer_state.state_file(state_dir(node), dataset, job_id) if job.training.keep_adam_state else None
    history = ledger.history(dataset)
    # The next round accounts for the same mechanisms: keep their RDP values for its process.
    save_memo(memo, [(noise, rate) for noise, rate, _ in history] + [(plan.noise_multiplier, plan.sample_rate)])
    job_steps = sum(steps for _, _, steps in ledger.history(dataset, job_id))
    entry = ledger.reserve(
        dataset, job_id, server_round, allowed.steps, plan.sample_rate, plan.noise_multiplier,
        job.privacy.max_grad_norm, local.sha256,
    )
    started = time.perf_counter()
    result = train_dp(
        model_kind(model_config).UpperStack(model, model_config),
        features,
        local.labels,
        plan,
        steps=allowed.steps,
        max_grad_norm=job.privacy.max_grad_norm,
        learning_rate=job.training.learning_rate,
        adapter_learning_rate=job.training.adapter_learning_rate,
        accountant=ledger.accountant(dataset),
        adam_state=optimizer_state.load(adam_file, weights) if adam_file else None,
        proximal_mu=float(instruction.config.get(m.PROXIMAL_MU, 0.0)),
        grad_sample_mode=job.training.grad_sample_mode,
        physical_batch=job.training.physical_batch,
        autocast=job.training.autocast,
        gradient_checkpointing=job.training.gradient_checkpointing,
        on_step=lambda step, total, loss: emit(
            round=server_round, institution=local.name, step=step, steps=total, loss=loss
        ),
    )
    if result.history != compact([*history, (plan.noise_multiplier, plan.sample_rate, allowed.steps)]):
        raise RuntimeError("Opacus accounted for other steps than the ledger reserved; nothing is sent")
    records = published_count(len(local.records))
    # Institution-level DP bounds each institution's influence on the average: equal weights.
    weight = 1 if KEY_CLIPPING_NORM in instruction.config else min(records, int(instruction.config[m.MAX_WEIGHT]))
    reply = FitRes(
        status=Status(Code.OK, "trained"),
        parameters=ndarrays_to_parameters(to_ndarrays(trainable_state(model))),
        num_examples=weight,
        metrics={
            m.INSTITUTION: local.name,
            m.ACCOUNTANT: budget.accountant,
            m.RECORDS: records,
            m.EPSILON: allowed.job_epsilon,
            m.DATASET_EPSILON: allowed.dataset_epsilon,
            m.BUDGET_EPSILON: budget.epsilon,
            m.GRANT_EPSILON: grant.granted,
            m.DELTA: budget.delta,
            m.NOISE_MULTIPLIER: plan.noise_multiplier,
            m.SAMPLE_RATE: plan.sample_rate,
            m.STEPS: allowed.steps,
            m.TOTAL_STEPS: job_steps + allowed.steps,
            m.MAX_GRAD_NORM: job.privacy.max_grad_norm,
            m.TRAIN_SECONDS: math.ceil(time.perf_counter() - started),
        },
    )
    check_deadline(msg, server_round)  # training took past it: the entry stays pending, uncounted
    ledger.release(entry)  # last thing before the update leaves: see client/privacy/ledger.py
    if adam_file:  # only now: an unreleased round's gradients must not reach the next update
        optimizer_state.save(adam_file, weights, result.adam_state)
    return Message(compat.fitres_to_recorddict(reply, keep_input=True), reply_to=msg)


def published_count(records: int) -> int:
    """The record count as it leaves the institution: rounded up to `RECORD_GRANULARITY`."""
    return max(1, math.ceil(records / m.RECORD_GRANULARITY)) * m.RECORD_GRANULARITY


def state_dir(node: NodeConfig) -> Path:
    """Where the institution keeps its ledger: its operator's state dir, or the simulation's."""
    if node.state_dir is not None:
        return node.state_dir
    base = os.environ.get(STATE_DIR_ENV)
    if not base:
        raise RuntimeError(f"no state-dir in the node config and {STATE_DIR_ENV} unset: nowhere to keep the ledger")
    return Path(base) / node.institution


@functools.lru_cache(maxsize=4)
def _prepared(model_json: str, labels: tuple[str, ...], device: str, local: LocalData, cache_dir: str):
    """The institution's model and cached features, kept for the next round in this process.

    Reusing the model is safe: every round overwrites all its trainable weights with the
    global ones, and its frozen weights never change.
    """
    config = ModelConfig.model_validate_json(model_json)
    kind = model_kind(config)
    model = kind.build_model(config, list(labels), pick_device(device))
    return model, kind.encode(model, config, local.records, Path(cache_dir))
