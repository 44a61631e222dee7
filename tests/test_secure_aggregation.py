"""SecAgg+ on the production path: the coordinator's code only ever holds masked vectors and their sum.

A simulated job runs the real ServerApp and ClientApp. The test listens on both sides of the
wire: a mod on each institution, inside SecAgg+, writes the plain update before it is masked; a
Grid around the coordinator keeps every message the ServerApp's code receives. The coordinator
must never receive a plain weight, each institution's masked vector must look nothing like its
update, and the next round's global weights must equal the weighted average of the plain updates.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import ServerApp

from client import app as institution
from common.config import load_config
from server import app as coordinator
from server.grid_decorator import GridDecorator
from simulations.engine import simulate

ROUNDS = 2


def listening_institution(folder) -> ClientApp:
    """The production ClientApp plus a mod, between SecAgg+ and clipping, that saves each plain update."""

    def save_plain_update(msg, context, call_next):
        reply = call_next(msg, context)
        fit_res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        name, server_round = fit_res.metrics["institution"], msg.metadata.group_id
        np.savez(folder / f"{server_round}-{name}.npz", weight=fit_res.num_examples,
                 *parameters_to_ndarrays(fit_res.parameters))
        return reply

    app = ClientApp(mods=[institution.secure_aggregation_mod, save_plain_update, institution.institution_clipping_mod])
    app.train()(institution.train)
    return app


class Eavesdropper(GridDecorator):
    """Keeps every message to and from the ServerApp's code, on Flower's side of fedtune's own Grid
    decorators: pushes and pulls (server/polling.py waits with them), or whole exchanges (pace "flower")."""

    def __init__(self, grid, sent: list, received: list):
        super().__init__(grid)
        self.sent, self.received = sent, received

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.received.extend(replies)
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


@pytest.fixture(scope="module")
def wiretap(banking_slice, slice_labels, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secagg")
    sent, received = [], []
    server_app = ServerApp()
    server_app.main()(lambda grid, context: coordinator.main(Eavesdropper(grid, sent, received), context))
    train, test = banking_slice
    job = load_config(overrides={
        "data.train_path": str(train), "data.test_path": str(test), "federation.institutions": 2,
        "federation.rounds": ROUNDS, "training.batch_size": 48, "training.threads": 1, "data.labels": slice_labels,
    })
    simulate(job, folder / "run", folder / "state", server_app=server_app, client_app=listening_institution(folder))
    return folder, sent, received


def masked_vectors(received) -> dict[tuple[str, int], np.ndarray]:
    """(round, node) -> the masked vector that node sent, as the coordinator received it."""
    vectors = {}
    for reply in received:
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if Key.MASKED_PARAMETERS in configs:
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            vectors[(reply.metadata.group_id, reply.metadata.src_node_id)] = np.concatenate([a.ravel() for a in arrays])
    return vectors


def test_coordinator_never_receives_a_plain_weight(wiretap):
    _, _, received = wiretap
    assert len(received) == ROUNDS * 2 * 4  # 4 SecAgg+ exchanges per institution per round
    for reply in received:
        assert not reply.has_error()
        assert sum(record.count_bytes() for record in reply.content.array_records.values()) == 0
    assert len(masked_vectors(received)) == ROUNDS * 2


def test_each_masked_vector_looks_nothing_like_the_update(wiretap):
    folder, _, received = wiretap
    for (server_round, node), masked in masked_vectors(received).items():
        name = next(str(r.content.config_records["fitres.metrics"]["institution"]) for r in received
                    if r.metadata.src_node_id == node and "fitres.metrics" in r.content.config_records)
        with np.load(folder / f"{server_round}-{name}.npz") as saved:
            plain = np.concatenate([saved[key].ravel() for key in saved.files if key != "weight"])
        masked = masked[1:]  # the first entry is the masked weight
        assert masked.shape == plain.shape
        assert abs(np.corrcoef(masked.astype(float), plain)[0, 1]) < 0.05
        assert np.ptp(masked) > 2**31  # masks are uniform over [0, 2^32)


def test_the_sum_is_the_weighted_average_of_the_plain_updates(wiretap):
    folder, sent, _ = wiretap
    for server_round in range(1, ROUNDS):
        updates = [np.load(path) for path in sorted(folder.glob(f"{server_round}-*.npz"))]
        assert len(updates) == 2
        weights = np.array([float(u["weight"]) for u in updates])
        plain = [[u[key] for key in u.files if key != "weight"] for u in updates]
        expected = [sum(w * p[i] for w, p in zip(weights, plain)) / weights.sum() for i in range(len(plain[0]))]
        instruction = next(m for m in sent if m.metadata.group_id == str(server_round + 1)
                           and "fitins.parameters" in m.content.array_records)
        received = parameters_to_ndarrays(compat.recorddict_to_fitins(instruction.content, True).parameters)
        for got, want in zip(received, expected, strict=True):
            np.testing.assert_allclose(got, want, atol=3e-5)  # quantisation: 2^-26 / weight share
        # and the average is not simply one institution's update
        assert max(np.abs(received[-1] - plain[0][-1]).max(), np.abs(received[-1] - plain[1][-1]).max()) > 1e-3


def test_the_secagg_download_is_float32_as_the_first_round_s(wiretap):
    """Flower decodes the SecAgg+ sum in float64; sent on as such, every later download doubled in bytes."""
    _, sent, _ = wiretap
    instructions = [m for m in sent if "fitins.parameters" in m.content.array_records]
    assert {m.metadata.group_id for m in instructions} == {str(r) for r in range(1, ROUNDS + 1)}
    for instruction in instructions:
        arrays = parameters_to_ndarrays(compat.recorddict_to_fitins(instruction.content, True).parameters)
        assert {a.dtype for a in arrays} == {np.dtype(np.float32)}, instruction.metadata.group_id
