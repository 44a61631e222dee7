"""The institution's ClientApp: trains the global model on local records with DP-SGD.

One train message = one round. The institution loads the global trainable weights, runs its
planned DP-SGD steps on cached lower-layer features, and replies with its new weights and an
account of what it released. Its privacy state (the noise plan and the accountant's history)
lives in the node's Flower context, so it carries across rounds of the job.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local_data import LocalData, load_local_data
from client.privacy_state import PrivacyState
from client.trainer import train_dp
from common import messages as m
from common.accounting import epsilon, plan_noise
from common.config import RUN_CONFIG_KEY, JobConfig
from common.model import (
    UpperStack,
    build_model,
    default_cache_dir,
    encode,
    load_trainable_state,
    pick_device,
    trainable_state,
)
from common.progress import emit

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    job = JobConfig.from_json(str(context.run_config[RUN_CONFIG_KEY]))
    if job.training.threads:
        torch.set_num_threads(job.training.threads)
    server_round = int(msg.content.config_records["config"][m.SERVER_ROUND])
    local = load_local_data(job, dict(context.node_config))
    device = pick_device(str(context.node_config.get("device", job.training.device)))
    model = build_model(job.model, job.data.labels, device, seed=job.federation.seed)
    features = encode(model, job.model, local.records.texts, context.node_config.get("cache-dir", default_cache_dir()))
    load_trainable_state(model, msg.content.array_records["arrays"].to_torch_state_dict())

    state = PrivacyState.load(context.state)
    if state.plan is None:
        state.plan = plan_noise(
            records=len(local.records),
            batch_size=job.training.batch_size,
            local_epochs=job.training.local_epochs,
            rounds=job.federation.rounds,
            target_epsilon=job.privacy.target_epsilon,
            delta=job.privacy.delta,
            accountant=job.privacy.accountant,
        )
    plan = state.plan
    started = time.perf_counter()
    result = train_dp(
        UpperStack(model, job.model.trainable_layers),
        features,
        local.labels,
        plan,
        max_grad_norm=job.privacy.max_grad_norm,
        learning_rate=job.training.learning_rate,
        accountant=job.privacy.accountant,
        history=state.history,
        proximal_mu=float(msg.content.config_records["config"].get(m.PROXIMAL_MU, 0.0)),
        on_step=lambda step, steps, loss: emit(
            round=server_round, institution=local.name, step=step, steps=steps, loss=loss
        ),
    )
    state.history = result.history
    state.save(context.state)
    return Message(_reply(job, local, model, result, state, time.perf_counter() - started), reply_to=msg)


def _reply(job: JobConfig, local: LocalData, model, result, state: PrivacyState, seconds: float) -> RecordDict:
    plan = state.plan
    metrics = MetricRecord(
        {
            m.NUM_EXAMPLES: len(local.records),
            m.TRAIN_LOSS: result.mean_loss,
            m.FIRST_LOSS: result.first_loss,
            m.LAST_LOSS: result.last_loss,
            m.EPSILON: epsilon(state.history, job.privacy.delta, job.privacy.accountant),
            m.DELTA: job.privacy.delta,
            m.NOISE_MULTIPLIER: plan.noise_multiplier,
            m.SAMPLE_RATE: plan.sample_rate,
            m.STEPS: plan.steps_per_round,
            m.TOTAL_STEPS: sum(steps for _, _, steps in state.history),
            m.MAX_GRAD_NORM: job.privacy.max_grad_norm,
            m.TRAIN_SECONDS: seconds,
        }
    )
    return RecordDict(
        {
            "arrays": ArrayRecord(trainable_state(model)),
            "metrics": metrics,
            m.INFO: ConfigRecord({m.INSTITUTION: local.name}),
        }
    )
