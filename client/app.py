"""The institution's ClientApp: Flower's mods around one training round (client/round.py).

One round = one train instruction (a legacy `FitIns`, see common/messages.py). Three mods wrap
it, outermost first:
- `boundary_mod` is the institution's trust boundary: whatever happens inside, what leaves is a
  reply whose metrics are all in `messages.REPLY_METRICS`, or a `Refusal` (a reason code and a
  fixed sentence). An exception's text, a record value, a column name or a path goes only to the
  institution's own log (this process's stderr, which the node daemon shows its operator).
- `secure_aggregation_mod`: Flower's SecAgg+ masks the weights when the coordinator runs it.
- `institution_clipping_mod`: Flower's fixedclipping_mod when the job has institution-level DP.
SecAgg+ adds three exchanges per round that never reach the training code, and in deployment
Flower starts a fresh process per message: so this module imports only Flower, numpy and
pydantic, and torch, transformers and Opacus load only for the message that trains.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np
from flwr.app import Context, Error, Message
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common import messages as m
from common.config import NodeConfig


def local_log(message: str) -> None:
    """The institution's own log; never sent."""
    print(f"fedtune-client: {message}", file=sys.stderr, flush=True)


def refusal_reply(msg: Message, institution: str, reason: m.Reason) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=m.Refusal(institution, reason).encode()),
                   reply_to=msg)


def boundary_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Only a vetted reply or a typed refusal leaves the institution (see the module docstring)."""
    try:
        institution = NodeConfig.model_validate(dict(context.node_config)).institution
    except ValueError:
        institution = "an institution"
    try:
        reply = call_next(msg, context)
    except m.Refused as refused:
        local_log(f"{msg.metadata.message_type} message of run {msg.metadata.run_id}: {refused.reason}: {refused.detail}")
        return refusal_reply(msg, institution, refused.reason)
    except Exception:  # noqa: BLE001 - whatever it was, its text must not cross
        local_log(f"{msg.metadata.message_type} message of run {msg.metadata.run_id} failed:\n{traceback.format_exc()}")
        return refusal_reply(msg, institution, m.Reason.INTERNAL_ERROR)
    if reply.has_error():
        if m.Refusal.decode(reply.error.reason) is None:
            local_log(f"run {msg.metadata.run_id}: a Flower error replaced by a refusal: {reply.error.reason}")
            return refusal_reply(msg, institution, m.Reason.INTERNAL_ERROR)
        return reply
    unexpected = set(reply.content.config_records.get(m.FIT_METRICS, {})) - m.REPLY_METRICS
    if unexpected:
        local_log(f"run {msg.metadata.run_id}: reply held unvetted metrics {sorted(unexpected)}; not sent")
        return refusal_reply(msg, institution, m.Reason.INTERNAL_ERROR)
    return reply


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


def _instruction(msg: Message):
    return compat.recorddict_to_fitins(msg.content, keep_input=True)


def institution_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixedclipping_mod when the coordinator adds institution-level noise, and a receipt.

    The receipt (the bound, in the reply's metrics) is what lets the coordinator refuse to noise an
    update nobody clipped: Flower's server wrapper cannot tell on its own.
    """
    bound = _instruction(msg).config.get(KEY_CLIPPING_NORM) if msg.metadata.message_type == "train" else None
    if bound is None:
        return call_next(msg, context)
    reply = fixedclipping_mod(msg, context, call_next)
    if not reply.has_error():
        reply.content.config_records[m.FIT_METRICS][m.CLIPPED_TO] = float(bound)
    return reply


# Order matters (FLOWER_NOTES): SecAgg+ masks what clipping left; the boundary sees every reply.
MODS = [boundary_mod, secure_aggregation_mod, institution_clipping_mod]
app = ClientApp(mods=MODS)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from client.round import train_round  # heavy imports: see the module docstring

    return train_round(msg, context)
