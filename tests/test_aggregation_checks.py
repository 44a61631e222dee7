"""The coordinator's checks on what becomes the global model (server/update_checks.py), played as the attacker.

Pure tests pin the SecAgg+ quantisation range with Flower's own quantiser; the strategy wrapper is
fed real Flower FitRes objects; two end-to-end tests run Flower's real DefaultWorkflow and
SecAggPlusWorkflow against Flower's real `secaggplus_mod` (fedtune's ClientApp mod) in one process,
through a Grid that hands each message to its institution's code (the protocol's keys, shares, masks
and unmasking are Flower's; only the network is left out).
"""

from __future__ import annotations

import copy
import math
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client import app as institution
from common import messages as m
from common.config import load_config
from server.round_log import RecordingGrid, RoundLog
from server.strategy import INT32_MAX, MODULUS, make_strategy, make_workflow, quantization_range
from server.update_checks import AGGREGATE, CheckedUpdates, Rejection, UpdateBounds, check_sum, check_update

CLIP = 8.0
SHAPES = ((3,), (2, 2))


@pytest.fixture(autouse=True)
def flower_task():
    """Flower stamps every Message with the task it runs in; out of a run, say which."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


# --- what Flower's secaggplus_mod and SecAggPlusWorkflow do to numbers, with Flower's functions ---

def institution_vector(update, weight, max_weight, target_range):
    """What secaggplus_mod computes before masking (flwr 1.39 `_collect_masked_vectors`)."""
    q_ratio = round(weight / max_weight * target_range)
    weighted = parameters_multiply([np.asarray(a, dtype=np.float64) for a in update], q_ratio / target_range)
    return factor_combine(q_ratio, quantize(weighted, CLIP, target_range))


def coordinator_sum(vectors):
    """The masks cancel; what the coordinator holds is the sum modulo 2^32. Also the sum unreduced."""
    total = [np.asarray(a, dtype=np.int64) for a in vectors[0]]
    for vector in vectors[1:]:
        total = parameters_addition(total, [np.asarray(a, dtype=np.int64) for a in vector])
    return parameters_mod(total, MODULUS), total


def decode(summed, institutions, target_range):
    """SecAggPlusWorkflow.unmask_stage after the masks are removed (flwr 1.39)."""
    q_total_ratio, values = factor_extract(summed)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_dq_total_ratio = target_range / q_total_ratio
        decoded = dequantize(values, CLIP, target_range)
        for vec in decoded:
            vec += -(institutions - 1) * CLIP
            vec *= inv_dq_total_ratio
    return decoded


def secagg_round(updates, weights, max_weight, target_range):
    reduced, unreduced = coordinator_sum(
        [institution_vector(u, w, max_weight, target_range) for u, w in zip(updates, weights)])
    return decode(reduced, len(updates), target_range), reduced, unreduced


def test_no_sum_of_honest_quantised_inputs_wraps_the_modulus_for_2_to_16_institutions():
    """Regression (-inf global model): 4 or 8 institutions at max_weight decoded a total weight of 0."""
    rng = np.random.default_rng(7)
    for n in range(2, 17):
        target_range = quantization_range(n)
        # Each quantised value is at most R + 1, the weight factor at most R: the sum stays below 2^32,
        # and R is the largest range for which that holds; the int32 cast of Flower's rounding holds R + 1.
        assert n * (target_range + 1) <= MODULUS - 1 < n * (target_range + 2)
        assert target_range + 1 <= INT32_MAX
        # Every institution at max_weight, every value at +clip, -clip or beyond (clipped), and random within.
        plain = [np.concatenate([np.full(500, CLIP), np.full(500, -CLIP), [3 * CLIP, -3 * CLIP],
                                 rng.uniform(-CLIP, CLIP, 200)]) for _ in range(n)]
        plain[0][:500] = -CLIP  # not every coordinate the same sign
        decoded, reduced, unreduced = secagg_round([[p] for p in plain], [1] * n, 1, target_range)
        for low, high in zip(reduced, unreduced):
            assert np.array_equal(low, high)  # nothing wrapped
            assert high.max() < MODULUS
        assert int(reduced[0][0]) == n * target_range  # the total weight, in full
        expected = np.mean(np.clip(plain, -CLIP, CLIP), axis=0)
        np.testing.assert_allclose(decoded[0], expected, rtol=0, atol=2 * CLIP / target_range)
        assert np.isfinite(decoded[0]).all()


def test_the_old_power_of_two_range_wrapped_and_its_sum_is_rejected():
    """What the issue saw: 4 institutions at max_weight = 1 with R = 2^32 / 4; the sum is now refused."""
    old_range = 2**30
    decoded, reduced, _ = secagg_round([[np.full(3, 0.5)], ] * 4, [1] * 4, 1, old_range)
    assert int(reduced[0][0]) == 0  # 4 * 2^30 = 2^32 = 0 modulo 2^32
    assert not np.isfinite(decoded[0]).any()
    bounds = UpdateBounds(((3,),), CLIP, 1.0, 4, old_range)
    assert check_sum(results(decoded, [1] * 4), bounds) is Rejection.ZERO_TOTAL_WEIGHT


def test_a_range_exists_for_any_federation_size():
    for n in (17, 100, 1000, 10_000):
        target_range = quantization_range(n)
        assert target_range > 0 and n * (target_range + 1) < MODULUS
    with pytest.raises(ValueError):
        quantization_range(0)


# --- the strategy wrapper, fed real FitRes objects ---

def fit_res(arrays, weight=1, name="st-mary", parameters=None):
    return FitRes(Status(Code.OK, "trained"), parameters or ndarrays_to_parameters(arrays), weight,
                  {m.INSTITUTION: name})


def results(aggregate, weights):
    """What unmask_stage hands the strategy: every FitRes carries the one decoded sum, and its own weight."""
    parameters = ndarrays_to_parameters(aggregate)
    return [(GridClientProxy(node, None, 1), fit_res(None, w, f"inst-{node}", parameters))
            for node, w in enumerate(weights)]


def secagg_checker(institutions=4, max_weight=100):
    round_log = RoundLog()
    bounds = UpdateBounds(SHAPES, CLIP, float(max_weight), institutions, quantization_range(institutions))
    return CheckedUpdates(FedAvg(), bounds, round_log), round_log


def honest_sum(weights=(100, 30, 1, 77), max_weight=100, seed=0):
    rng = np.random.default_rng(seed)
    updates = [[rng.uniform(-CLIP, CLIP, 3), rng.choice([-CLIP, CLIP], (2, 2))] for _ in weights]
    decoded, _, _ = secagg_round(updates, list(weights), max_weight, quantization_range(len(weights)))
    return decoded, updates


def test_an_honest_secagg_sum_passes_and_is_the_weighted_average():
    checker, round_log = secagg_checker()
    weights = (100, 30, 1, 77)
    decoded, updates = honest_sum(weights)
    parameters, _ = checker.aggregate_fit(1, results(decoded, weights), [])
    got = parameters_to_ndarrays(parameters)
    for i, array in enumerate(got):
        want = sum(w * u[i] for w, u in zip(weights, updates)) / sum(weights)
        np.testing.assert_allclose(array, want, atol=1e-6)
    assert round_log.rejected == {}


@pytest.mark.parametrize(("tamper", "reason"), [
    (lambda a: a[0].__setitem__(1, np.nan), Rejection.NON_FINITE),
    (lambda a: a[1].__setitem__((0, 1), np.inf), Rejection.NON_FINITE),
    (lambda a: a[1].__setitem__((1, 1), -np.inf), Rejection.NON_FINITE),
    (lambda a: a[0].__setitem__(2, CLIP * 1.01), Rejection.OUT_OF_BOUNDS),
    (lambda a: a[1].__setitem__((0, 0), -3 * CLIP), Rejection.OUT_OF_BOUNDS),
])
def test_a_tampered_secagg_sum_is_rejected_and_the_model_stays(tamper, reason):
    checker, round_log = secagg_checker()
    decoded, _ = honest_sum()
    tamper(decoded)
    assert checker.aggregate_fit(3, results(decoded, (100, 30, 1, 77)), []) == (None, {})
    assert round_log.rejected == {3: {AGGREGATE: reason}}


def test_a_sum_whose_total_weight_decodes_as_zero_is_rejected():
    """The weight factors of 4 institutions sum to exactly 2^32 (an institution lying about its weight)."""
    target_range = quantization_range(4)
    vectors = [institution_vector([np.full(3, 1.0), np.full((2, 2), -1.0)], 100, 100, target_range) for _ in range(4)]
    vectors[3][0] = np.array([MODULUS - 3 * int(vectors[0][0][0])])
    reduced, _ = coordinator_sum(vectors)
    decoded = decode(reduced, 4, target_range)
    assert not np.isfinite(decoded[0]).any()
    checker, round_log = secagg_checker()
    assert checker.aggregate_fit(1, results(decoded, (100,) * 4), []) == (None, {})
    assert round_log.rejected == {1: {AGGREGATE: Rejection.ZERO_TOTAL_WEIGHT}}


def test_a_sum_whose_total_weight_wrapped_is_rejected_as_out_of_bounds():
    """An institution that does not cap its weight at max_weight, while reporting a capped one: the
    weights sum to just over 2^32, decode as a tenth of one institution's, and scale the average up.
    (A wrap that leaves the total large only rescales the average within the bound, like any bias.)"""
    target_range = quantization_range(4)
    updates = [[np.full(3, 4.0), np.full((2, 2), -4.0)]] * 4
    vectors = [institution_vector(u, 100, 100, target_range) for u in updates[:3]]
    vectors.append(institution_vector(updates[3], 110, 100, target_range))  # its real weight
    reduced, _ = coordinator_sum(vectors)
    assert int(reduced[0][0]) < target_range // 5  # the total weight wrapped
    decoded = decode(reduced, 4, target_range)
    assert np.isfinite(decoded[0]).all()
    checker, round_log = secagg_checker()
    assert checker.aggregate_fit(1, results(decoded, (100,) * 4), []) == (None, {})
    assert round_log.rejected == {1: {AGGREGATE: Rejection.OUT_OF_BOUNDS}}


def test_a_secagg_sum_with_a_weight_beyond_max_weight_or_too_many_inputs_or_wrong_shapes_is_rejected():
    decoded, _ = honest_sum()
    for weights, aggregate, reason in [
        ((100, 30, 101, 77), decoded, Rejection.WEIGHT_OUT_OF_RANGE),
        ((100, 30, 0, 77), decoded, Rejection.WEIGHT_OUT_OF_RANGE),
        ((100, 30, 1, 77, 5), decoded, Rejection.TOO_MANY_UPDATES),
        ((100, 30, 1, 77), [decoded[0], decoded[1].ravel()], Rejection.WRONG_SHAPE),
        ((100, 30, 1, 77), [*decoded, np.zeros(1)], Rejection.WRONG_ARRAY_COUNT),
    ]:
        checker, round_log = secagg_checker()
        assert checker.aggregate_fit(2, results(aggregate, weights), []) == (None, {})
        assert round_log.rejected == {2: {AGGREGATE: reason}}


# --- without SecAgg+: each update on its own ---

def plain_checker(void_round_on_rejection=False):
    round_log = RoundLog()
    bounds = UpdateBounds(SHAPES, CLIP, 100.0, 10)
    return CheckedUpdates(FedAvg(), bounds, round_log, void_round_on_rejection), round_log


GOOD_A = [np.array([1.0, 2.0, 3.0]), np.full((2, 2), -1.0)]
GOOD_B = [np.array([-2.0, 0.0, CLIP]), np.full((2, 2), 2.0)]
ATTACKS = {
    "nan": ([np.array([1.0, np.nan, 3.0]), np.zeros((2, 2))], 50, Rejection.NON_FINITE),
    "inf": ([np.array([1.0, 2.0, 3.0]), np.array([[0.0, np.inf], [0.0, 0.0]])], 50, Rejection.NON_FINITE),
    "wrong-shape": ([np.zeros(3), np.zeros((4, 1))], 50, Rejection.WRONG_SHAPE),
    "too-many-arrays": ([np.zeros(3), np.zeros((2, 2)), np.zeros(7)], 50, Rejection.WRONG_ARRAY_COUNT),
    "too-few-arrays": ([np.zeros(3)], 50, Rejection.WRONG_ARRAY_COUNT),
    "huge-norm": ([np.full(3, 1e6), np.full((2, 2), -1e6)], 50, Rejection.OUT_OF_BOUNDS),
    "just-beyond-clip": ([np.array([0.0, 0.0, CLIP + 1e-6]), np.zeros((2, 2))], 50, Rejection.OUT_OF_BOUNDS),
    "huge-weight": ([np.zeros(3), np.zeros((2, 2))], 10**9, Rejection.WEIGHT_OUT_OF_RANGE),
    "zero-weight": ([np.zeros(3), np.zeros((2, 2))], 0, Rejection.WEIGHT_OUT_OF_RANGE),
    "strings": ([np.array(["a", "b", "c"]), np.zeros((2, 2))], 50, Rejection.MALFORMED),
}


def test_bad_plain_updates_are_dropped_and_the_rest_average_to_their_weighted_average():
    checker, round_log = plain_checker()
    res = [(GridClientProxy(1, None, 1), fit_res(GOOD_A, 3, "good-a")),
           (GridClientProxy(2, None, 1), fit_res(GOOD_B, 1, "good-b"))]
    res += [(GridClientProxy(10 + i, None, 1), fit_res(arrays, weight, name))
            for i, (name, (arrays, weight, _)) in enumerate(ATTACKS.items())]
    parameters, _ = checker.aggregate_fit(4, res, [])
    for got, a, b in zip(parameters_to_ndarrays(parameters), GOOD_A, GOOD_B, strict=True):
        np.testing.assert_allclose(got, (3 * a + b) / 4)
    assert round_log.rejected == {4: {name: reason for name, (_, _, reason) in ATTACKS.items()}}


def test_unreadable_plain_arrays_are_rejected_as_malformed():
    from flwr.common import Parameters

    garbage = Parameters(tensors=[b"not a numpy array", b""], tensor_type="numpy.ndarray")
    assert check_update(fit_res(None, 1, parameters=garbage), UpdateBounds(SHAPES, CLIP, 1.0, 2)) is Rejection.MALFORMED


def test_when_every_plain_update_is_rejected_the_model_stays():
    checker, round_log = plain_checker()
    res = [(GridClientProxy(i, None, 1), fit_res(arrays, weight, name))
           for i, (name, (arrays, weight, _)) in enumerate(list(ATTACKS.items())[:3])]
    assert checker.aggregate_fit(1, res, []) == (None, {})
    assert set(round_log.rejected[1]) == set(list(ATTACKS)[:3])


def test_under_institution_dp_a_rejected_update_voids_the_round():
    checker, round_log = plain_checker(void_round_on_rejection=True)
    res = [(GridClientProxy(1, None, 1), fit_res(GOOD_A, 1, "good-a")),
           (GridClientProxy(2, None, 1), fit_res(ATTACKS["nan"][0], 1, "nan"))]
    assert checker.aggregate_fit(1, res, []) == (None, {})
    assert round_log.rejected == {1: {"nan": Rejection.NON_FINITE, AGGREGATE: Rejection.VOIDED_UNDER_INSTITUTION_DP}}


# --- end to end: Flower's workflows and secaggplus_mod, in one process ---

class InProcessGrid(Grid):
    """A Grid that hands each message, copied as the wire would, to its node's ClientApp code."""

    def __init__(self, nodes: dict[int, object]):
        self.nodes = nodes
        self.contexts = {node: Context(1, node, {}, RecordDict(), {}) for node in nodes}
        self._run = type("Run", (), {"run_id": 1})()

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # what the SuperLink does
            delivered = Message(content=copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata))
            node = message.metadata.dst_node_id
            reply = self.nodes[node](delivered, self.contexts[node])
            replies.append(Message(content=copy.deepcopy(reply.content), metadata=reply.metadata))
        return replies

    def set_run(self, run):
        pass

    @property
    def run(self):
        return self._run

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def institution_app(name, plan):
    """fedtune's SecAgg+ mod (Flower's secaggplus_mod, in float64) around a stand-in for training:
    plan(round, global arrays) -> (update, weight)."""

    def train(msg, context):
        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        update, weight = plan(int(msg.metadata.group_id), parameters_to_ndarrays(fit_ins.parameters))
        reply = FitRes(Status(Code.OK, "trained"), ndarrays_to_parameters(update), weight, {m.INSTITUTION: name})
        return Message(compat.fitres_to_recorddict(reply, keep_input=True), reply_to=msg)

    return lambda msg, context: institution.secure_aggregation_mod(msg, context, train)


def run_job(plans: dict[str, object], rounds=2, secure_aggregation=True, max_weight=1, workflow=None):
    """A job on Flower's real workflow; returns the global weights after each round and the round log."""
    job = load_config(overrides={
        "federation.institutions": len(plans), "federation.rounds": rounds,
        "secure_aggregation.enabled": secure_aggregation, "secure_aggregation.max_weight": max_weight,
        "secure_aggregation.clipping_range": CLIP,
    })
    initial = [np.zeros(3, dtype=np.float32), np.zeros((2, 2), dtype=np.float32)]
    seen = {}

    def evaluate(server_round, weights, config):
        seen[server_round] = [np.array(w) for w in weights]
        return 0.0, {}

    round_log = RoundLog()
    strategy = make_strategy(job, ndarrays_to_parameters(initial), evaluate, round_log)
    grid = InProcessGrid({100 + i: institution_app(name, plan) for i, (name, plan) in enumerate(plans.items())})
    legacy = LegacyContext(Context(1, 0, {}, RecordDict(), {}), config=ServerConfig(num_rounds=rounds),
                           strategy=strategy)
    (workflow or make_workflow(job))(RecordingGrid(grid, round_log, 60), legacy)
    seen["final"] = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
    return seen, round_log


def steady(value, weight=1):
    return lambda server_round, global_arrays: ([np.full(3, value), np.full((2, 2), -value)], weight)


def test_four_institutions_at_max_weight_one_through_flowers_secagg_give_the_average():
    """The issue's case, end to end: formerly a total weight of 0 and a -inf model."""
    values = {"a": CLIP, "b": -CLIP, "c": 2.0, "d": 5.0}
    seen, round_log = run_job({name: steady(v) for name, v in values.items()})
    mean = np.mean(list(values.values()))
    for server_round in (1, 2):
        np.testing.assert_allclose(seen[server_round][0], mean, atol=1e-6)
        np.testing.assert_allclose(seen[server_round][1], -mean, atol=1e-6)
    assert round_log.rejected == {}
    assert set(round_log.replies[1]) == set(values)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # Flower's decode dividing by the 0 total
def test_with_the_old_range_flowers_secagg_sum_is_rejected_and_the_model_stays():
    """The same job with the range used before: the checks catch what would have been -inf."""
    job = load_config(overrides={"federation.institutions": 4, "secure_aggregation.max_weight": 1})
    old = make_workflow(job)
    old.fit_workflow.quantization_range = 2 ** int(math.log2(MODULUS // 4))
    seen, round_log = run_job({name: steady(1.0) for name in "abcd"}, rounds=1, workflow=old)
    assert round_log.rejected == {1: {AGGREGATE: Rejection.ZERO_TOTAL_WEIGHT}}
    for got in (seen[1], seen["final"]):
        assert all(np.array_equal(a, np.zeros_like(a)) for a in got)


def test_an_institution_that_does_not_cap_its_weight_gets_the_sum_rejected_and_the_job_goes_on():
    plans = {name: steady(1.0, weight=50) for name in "abc"}
    plans["greedy"] = lambda rnd, g: ([np.full(3, 1.0), np.full((2, 2), -1.0)], 10**6 if rnd == 1 else 50)
    seen, round_log = run_job(plans, max_weight=50)
    assert round_log.rejected == {1: {AGGREGATE: Rejection.WEIGHT_OUT_OF_RANGE}}
    assert all(np.array_equal(a, np.zeros_like(a)) for a in seen[1])  # round 1 left the model as it was
    np.testing.assert_allclose(seen[2][0], 1.0, atol=1e-6)  # round 2 aggregated


def test_without_secagg_a_nan_update_is_dropped_on_flowers_workflow_and_the_others_average():
    plans = {"a": steady(2.0, weight=3), "b": steady(-2.0, weight=1),
             "poisoner": lambda rnd, g: ([np.full(3, np.nan), np.zeros((2, 2))], 1)}
    seen, round_log = run_job(plans, rounds=1, secure_aggregation=False, max_weight=100)
    assert round_log.rejected == {1: {"poisoner": Rejection.NON_FINITE}}
    np.testing.assert_allclose(seen[1][0], (3 * 2.0 - 2.0) / 4)
    np.testing.assert_allclose(seen[1][1], -(3 * 2.0 - 2.0) / 4)


def test_rejections_reach_metrics_json_and_privacy_md():
    from server.report import build_metrics, privacy_report, render_privacy_markdown

    round_log = RoundLog()
    round_log.reject(1, "st-mary", Rejection.NON_FINITE)
    round_log.reject(2, AGGREGATE, Rejection.ZERO_TOTAL_WEIGHT)
    metrics = build_metrics(load_config(), {1: {"accuracy": 0.5, "loss": 1.0}, 2: {"accuracy": 0.5, "loss": 1.0}},
                            round_log, {})
    assert [r["rejected"] for r in metrics["rounds"]] == [{"st-mary": "non-finite"}, {AGGREGATE: "zero-total-weight"}]
    privacy = privacy_report(metrics)
    assert privacy["rejected"] == {"1": {"st-mary": "non-finite"}, "2": {AGGREGATE: "zero-total-weight"}}
    text = render_privacy_markdown(privacy)
    assert "Round 1: the coordinator rejected st-mary's update (non-finite: a value is NaN or infinite)" in text
    assert "Round 2: the coordinator rejected the round's aggregate (zero-total-weight" in text
    assert "the global model stayed as it was" in text
