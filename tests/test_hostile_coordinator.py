"""The coordinator as the attacker: every job it can craft against an institution's real ClientApp.

Each test builds the instruction a hostile coordinator would send and hands it to the production
ClientApp (client/app.py, all its mods) with a deployed institution's node config, as its SuperNode
would: real data file, real ledger file, the packaged model, real Opacus training. What comes back
is exactly what would cross the boundary. The deployment-level versions (over TLS, the SuperLink's
database read afterwards) are in tests/test_deployment.py.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as institution_app
from client.privacy.budget import BudgetError, resolve_dataset, set_budget
from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common import messages as m
from common.accounting import epsilon
from common.config import JOB_ID_KEY, REPO_ROOT, JobConfig, NodeConfig, load_config
from common.data import file_fingerprint
from common.model_files import model_digest, packaged_model_path

BUDGET, DELTA, ACCOUNTANT = 8.0, 1e-6, "prv"
SECRETS = {"patient_name": ["Alice Zyxwvuts", "Bob Qwertyuiop"], "diagnosis": ["HIV positive", "Hepatitis C"]}


@pytest.fixture(autouse=True)
def flower_task():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


@pytest.fixture(scope="module")
def records(banking_slice, tmp_path_factory) -> Path:
    """An institution's file: the slice's texts and labels, plus two columns no job ever names."""
    folder = tmp_path_factory.mktemp("st-mary")
    with banking_slice[0].open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[::2]
    path = folder / "records-of-st-mary.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category", *SECRETS])
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow(row | {column: values[index % 2] for column, values in SECRETS.items()})
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The model the institution operator pinned: a copy of the packaged one, so a test may alter it."""
    folder = tmp_path_factory.mktemp("pinned") / "model"
    shutil.copytree(packaged_model_path(), folder)
    return folder


class Institution:
    """A deployed institution as its daemon sets it up: budget in its ledger, node config on disk."""

    def __init__(self, folder: Path, records: Path, model_dir: Path):
        self.records, self.state = records, folder / "state"
        self.ledger = PrivacyLedger(self.state / LEDGER_FILE)
        self.dataset = resolve_dataset(self.ledger, records, file_fingerprint(records), None)
        set_budget(self.ledger, self.dataset, records, file_fingerprint(records), epsilon_budget=BUDGET, delta=DELTA,
                   accountant=ACCOUNTANT)
        self.node_config = NodeConfig(
            name="st-mary", data_path=records, dataset_id=self.dataset, state_dir=self.state,
            cache_dir=folder / "cache", device="cpu", model_dir=model_dir, model_sha256=model_digest(model_dir),
        ).to_flower()

    def round(self, job: JobConfig, run_id: int = 1, server_round: int = 1, weights_of: JobConfig | None = None,
              job_id: str | None = None) -> Message:
        """One train instruction from the coordinator through the real ClientApp; the reply it sends back.
        The weights sent are `weights_of`'s initial ones (default: the job's)."""
        from common.models.device import pick_device
        from common.models.encoder import build_model
        from common.models.transport import to_ndarrays, trainable_state

        TaskIdentity.run_id = run_id
        shaped = weights_of or job
        model = build_model(shaped.model.model_copy(update={"path": None}), shaped.data.labels or ["x"],
                            pick_device("cpu"))
        fitins = FitIns(ndarrays_to_parameters(to_ndarrays(trainable_state(model))),
                        {m.SERVER_ROUND: server_round, m.MAX_WEIGHT: 100_000})
        message = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train",
                          group_id=str(server_round), ttl=3600)
        context = Context(run_id=run_id, node_id=1, node_config=dict(self.node_config), state=RecordDict(),
                          run_config={"job": job.to_json(), **({JOB_ID_KEY: job_id} if job_id else {})})
        return institution_app(message, context)

    def spent(self) -> float:
        return self.ledger.spent(self.dataset)


@pytest.fixture
def institution(tmp_path, records, model_dir) -> Institution:
    return Institution(tmp_path, records, model_dir)


def hostile_job(labels: list[str], model_dir: Path, **overrides) -> JobConfig:
    job = load_config(overrides={"data.labels": labels, "federation.rounds": 2, "training.batch_size": 48,
                                 "training.threads": 1, "model.sha256": model_digest(model_dir), **overrides})
    return job


def everything_sent(reply: Message) -> str:
    """All a reply carries, as text: the error's reason, every record's keys and values."""
    if reply.has_error():
        return f"{reply.error.code} {reply.error.reason}"
    content = reply.content
    parts = [repr(dict(record)) for record in [*content.config_records.values(), *content.metric_records.values()]]
    return " ".join([*content.array_records.keys(), *parts])


def file_values(path: Path) -> set[str]:
    """Every header and cell of the file, and its path: none of it may reach the coordinator."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    return {cell for row in rows for cell in row} | {str(path), path.name, str(path.parent)}


def refusal(reply: Message) -> m.Refusal:
    assert reply.has_error()
    decoded = m.Refusal.decode(reply.error.reason)
    assert decoded is not None, f"not a typed refusal: {reply.error.reason}"
    return decoded


@pytest.mark.parametrize("probe", [
    {"data.label_column": "diagnosis"},  # "is 'HIV positive' one of your labels?"
    {"data.label_column": "patient_name"},
    {"data.text_column": "nope"},  # "which columns do you have?"
    {"data.labels": ["activate_my_card"]},  # a label set that misses most of the file's labels
])
def test_label_and_column_probing_returns_no_record_value_header_or_path(institution, slice_labels, model_dir, probe,
                                                                         capfd):
    """Regression: the error text once carried `label 'HIV positive' is not one of the job's labels`
    and the file's column list, so repeated jobs walked through every value of any column."""
    job = hostile_job(slice_labels, model_dir, **probe)
    reply = institution.round(job)
    assert refusal(reply) == m.Refusal("st-mary", m.Reason.DATA_MISMATCH)
    sent = everything_sent(reply)
    leaked = {value for value in file_values(institution.records) if value and value in sent and value != "st-mary"}
    assert not leaked
    assert institution.spent() == 0.0  # refused before any release
    assert "record" in capfd.readouterr().err  # the details went to the institution's own log


def test_a_failure_inside_the_institution_crosses_as_a_fixed_sentence(institution, slice_labels, model_dir):
    """An exception's text (here naming the model folder) never crosses: an internal error is a code."""
    job = hostile_job(slice_labels, model_dir, **{"model.adapt": "top_layers", "model.lora_targets": ["no_such_layer"]})
    reply = institution.round(job, weights_of=hostile_job(slice_labels, model_dir))
    assert refusal(reply).reason == m.Reason.INTERNAL_ERROR
    assert str(model_dir) not in everything_sent(reply) and "no_such_layer" not in everything_sent(reply)


def test_a_reply_carries_only_the_update_and_data_free_facts(institution, slice_labels, model_dir):
    reply = institution.round(hostile_job(slice_labels, model_dir))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    fit = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert set(fit.metrics) <= m.REPLY_METRICS and "train-loss" not in fit.metrics
    with institution.records.open(encoding="utf-8") as handle:
        records = sum(1 for _ in handle) - 1
    assert fit.metrics[m.RECORDS] == fit.num_examples and fit.metrics[m.RECORDS] % m.RECORD_GRANULARITY == 0
    assert fit.metrics[m.RECORDS] != records and fit.metrics[m.RECORDS] >= records  # rounded up, never exact
    assert float(fit.metrics[m.TRAIN_SECONDS]).is_integer()
    assert not {v for v in file_values(institution.records) if len(v) > 3 and v in everything_sent(reply)}


def test_an_unvetted_reply_key_is_never_sent():
    """The boundary fails closed: a reply with a metric outside REPLY_METRICS becomes a refusal."""
    from client.app import boundary_mod

    message = Message(RecordDict(), dst_node_id=1, message_type="train", group_id="1")

    def leaky(msg, context):
        return Message(RecordDict({m.FIT_METRICS: ConfigRecord({"first-record": "HIV positive"})}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={"name": "st-mary"}, state=RecordDict(), run_config={})
    reply = boundary_mod(message, context, leaky)
    assert refusal(reply).reason == m.Reason.INTERNAL_ERROR and "HIV" not in everything_sent(reply)


@pytest.mark.timeout(600)
def test_jobs_cannot_set_or_reprice_the_budget_and_spent_never_decreases(institution, slice_labels, model_dir):
    """Regression: a job with `privacy.delta = 0.5` was once planned at that delta and re-priced the
    history (spent 8.78 -> -0.33); the job's epsilon, delta and accountant became the budget."""
    hostile = [
        {"privacy.delta": 0.5},
        {"privacy.target_epsilon": 1000.0},
        {"privacy.accountant": "rdp"},
        {"federation.rounds": 10_000},
        {"training.batch_size": 10**9},
    ]
    spent = [institution.spent()]
    for run_id, overrides in enumerate(hostile, start=1):
        job = hostile_job(slice_labels, model_dir, **overrides)
        reply = institution.round(job, run_id=run_id)
        stored = institution.ledger.dataset(institution.dataset).budget
        assert (stored.epsilon, stored.delta, stored.accountant) == (BUDGET, DELTA, ACCOUNTANT)
        spent.append(institution.spent())
        assert spent[-1] >= spent[-2] and spent[-1] <= BUDGET, overrides
        grant = institution.ledger.grant(institution.dataset, str(run_id))
        if grant is not None:
            assert grant.requested == job.privacy.target_epsilon and grant.granted <= min(grant.requested, BUDGET)
            # The whole planned job, all its rounds, fits its grant at the institution's own terms.
            assert epsilon(grant.plan.history(grant.plan.rounds), DELTA, ACCOUNTANT) <= grant.granted + 1e-9
            assert institution.ledger.spent(institution.dataset, str(run_id)) <= grant.granted + 1e-9
        if not reply.has_error():
            metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
            assert (metrics[m.DELTA], metrics[m.ACCOUNTANT], metrics[m.BUDGET_EPSILON]) == (DELTA, ACCOUNTANT, BUDGET)
            assert metrics[m.GRANT_EPSILON] == grant.granted and metrics[m.EPSILON] <= grant.granted + 1e-9
        else:
            assert refusal(reply).reason == m.Reason.BUDGET_SPENT
    assert spent[-1] > 0
    # The 1000-epsilon job got what was left, not 1000; everything after it was declined or cut short.
    assert institution.ledger.grant(institution.dataset, "2").granted < BUDGET


def test_only_the_operator_changes_delta_or_accountant_and_never_downward(tmp_path, records):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    sha = file_fingerprint(records)
    set_budget(ledger, "bank", records, sha, epsilon_budget=8.0, delta=1e-6, accountant="prv")
    ledger.release(ledger.reserve("bank", "job", 1, 40, 0.1, 1.0, 1.0, sha))
    before = ledger.spent("bank")
    with pytest.raises(BudgetError, match="--force-budget-change"):
        set_budget(ledger, "bank", records, sha, epsilon_budget=None, delta=1e-3, accountant=None)
    with pytest.raises(BudgetError, match="re-price"):  # a larger delta lowers epsilon: refused even forced
        set_budget(ledger, "bank", records, sha, epsilon_budget=None, delta=1e-3, accountant=None, force=True)
    assert ledger.spent("bank") == before
    set_budget(ledger, "bank", records, sha, epsilon_budget=None, delta=1e-8, accountant=None, force=True)
    assert ledger.spent("bank") > before  # stricter terms re-price upward only
    changes = ledger.budget_changes("bank")
    assert [c["delta"] for c in changes] == [1e-6, 1e-8] and changes[-1]["forced"] == 1 and changes[-1]["changed_by"]


def test_an_edited_data_file_keeps_its_spent_budget(tmp_path, records):
    """Regression: the ledger keyed a data set by its file's bytes, so an exhausted file plus one
    row had its whole budget back."""
    data = tmp_path / "bank.csv"
    shutil.copy(records, data)
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE)
    dataset = resolve_dataset(ledger, data, file_fingerprint(data), None)
    set_budget(ledger, dataset, data, file_fingerprint(data), epsilon_budget=1.0, delta=1e-6, accountant="rdp")
    ledger.release(ledger.reserve(dataset, "job", 1, 500, 0.5, 0.8, 1.0, file_fingerprint(data)))
    spent = ledger.spent(dataset)
    with data.open("a", encoding="utf-8") as handle:
        handle.write("one more record,activate_my_card,x,y\n")
    with pytest.raises(BudgetError, match=f"--dataset-id {dataset}"):  # no silent fresh budget
        resolve_dataset(ledger, data, file_fingerprint(data), None)
    assert resolve_dataset(ledger, data, file_fingerprint(data), dataset) == dataset
    set_budget(ledger, dataset, data, file_fingerprint(data), epsilon_budget=None, delta=None, accountant=None)
    assert ledger.spent(dataset) == spent and ledger.dataset(dataset).sha256 == file_fingerprint(data)
    moved = tmp_path / "moved.csv"
    shutil.copy(data, moved)  # the same records at another path are the same data set
    assert resolve_dataset(ledger, moved, file_fingerprint(moved), None) == dataset


def test_a_job_naming_another_model_is_refused(institution, slice_labels, model_dir):
    other = hostile_job(slice_labels, model_dir, **{"model.sha256": "0" * 64})
    assert refusal(institution.round(other)).reason == m.Reason.MODEL_NOT_PINNED
    # The job's own model.path is never opened: the institution loads its pinned folder.
    elsewhere = hostile_job(slice_labels, model_dir, **{"model.path": str(model_dir.parent / "not-there")})
    assert not institution.round(elsewhere, run_id=2).has_error()
    (model_dir / "README.md").write_text("swapped after the operator pinned it\n")
    assert refusal(institution.round(elsewhere, run_id=3)).reason == m.Reason.MODEL_NOT_PINNED
    assert institution.ledger.grant(institution.dataset, "3") is None  # refused before any planning


def test_the_hub_is_off_whatever_the_environment_says():
    code = "import common, os; print(os.environ['HF_HUB_OFFLINE'], os.environ['TRANSFORMERS_OFFLINE'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"})
    assert result.stdout.split() == ["1", "1"], result.stderr


def test_the_daemon_refuses_to_start_without_a_budget_of_its_operator(tmp_path, records):
    from client import cli as client_cli

    args = ["start", "--insecure", "--superlink", "127.0.0.1:1", "--data", str(records), "--name", "st-mary",
            "--state-dir", str(tmp_path / "state")]
    assert client_cli.main(args) == 2
    assert not (tmp_path / "state" / "node-config.toml").exists()


def test_budget_finds_the_default_state_folder_and_says_where_it_looked(tmp_path, records):
    home = tmp_path / "home"
    env = {"PATH": "/usr/bin", "HOME": str(home)}
    setting = subprocess.run([sys.executable, "-m", "client.cli", "budget", "set", "--data", str(records),
                              "--budget-epsilon", "4", "--budget-delta", "1e-6"],
                             cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    assert setting.returncode == 0, setting.stderr
    shown = subprocess.run([sys.executable, "-m", "client.cli", "budget"], cwd=REPO_ROOT, capture_output=True,
                           text=True, env=env)
    assert f"privacy ledger {home / '.fedtune' / 'institution' / LEDGER_FILE}" in shown.stdout
    assert "budget    epsilon 4 at delta 1e-06 (prv accountant)" in shown.stdout
    listed = json.loads(subprocess.run([sys.executable, "-m", "client.cli", "budget", "--json"], cwd=REPO_ROOT,
                                       capture_output=True, text=True, env=env).stdout)
    assert listed[0]["budget_changes"][0]["changed_by"]


def test_a_resumed_job_keeps_its_grant_and_a_reused_job_id_buys_no_second_one(institution, slice_labels, model_dir):
    """The job id, not Flower's run id, keys the ledger: the resumed job (a new run id) draws on the plan made for
    it, and a coordinator that reuses the id with a bigger request gets nothing beyond the first grant."""
    job_id = "job-00000000000000aa"
    assert not institution.round(hostile_job(slice_labels, model_dir), run_id=101, job_id=job_id).has_error()
    grant = institution.ledger.grant(institution.dataset, job_id)
    greedy = hostile_job(slice_labels, model_dir, **{"privacy.target_epsilon": 1000.0, "federation.rounds": 1})
    for server_round in (1, 2, 3):  # round 1 again (lost in a crash), then more than were planned
        institution.round(greedy, run_id=102, server_round=server_round, job_id=job_id)
    assert institution.ledger.grant(institution.dataset, job_id) == grant  # the same plan, not a new grant
    assert list(institution.ledger.grants(institution.dataset)) == [job_id]
    assert institution.ledger.spent(institution.dataset, job_id) <= grant.granted + 1e-9
    for bad in ("../../ledger", "job-" + "0" * 200, "7; DROP TABLE releases"):
        reply = institution.round(hostile_job(slice_labels, model_dir), run_id=103, job_id=bad)
        assert refusal(reply).reason == m.Reason.BAD_INSTRUCTION and bad not in everything_sent(reply)


def adam_steps(path: Path) -> set[int]:
    """The step count of every weight's saved Adam state."""
    import torch

    return {int(state["step"]) for state in torch.load(path, weights_only=True)["state"].values()}


def test_adam_state_goes_on_across_a_jobs_rounds_and_stays_private_in_the_state_dir(institution, slice_labels,
                                                                                     model_dir):
    from client.optimizer_state import state_file

    job, job_id = hostile_job(slice_labels, model_dir, **{"privacy.target_epsilon": 3.0}), "job-00000000000000ad"
    for server_round in (1, 2):
        assert not institution.round(job, server_round=server_round, job_id=job_id).has_error()
    path = state_file(institution.state, institution.dataset, job_id)
    job_steps = sum(steps for _, _, steps in institution.ledger.history(institution.dataset, job_id))
    assert job_steps > 0 and adam_steps(path) == {job_steps}  # one Adam across both rounds, not a fresh one each
    assert path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
    assert job_id not in path.name and institution.dataset not in path.name
    assert not institution.round(job, job_id="job-00000000000000ae").has_error()
    other = state_file(institution.state, institution.dataset, "job-00000000000000ae")
    other_steps = sum(steps for _, _, steps in institution.ledger.history(institution.dataset, "job-00000000000000ae"))
    assert adam_steps(other) == {other_steps} and other_steps < job_steps  # another job starts its own Adam


def test_a_round_never_released_leaves_nothing_in_the_next_rounds_adam(institution, slice_labels, model_dir,
                                                                      monkeypatch):
    """The coordinator lets a round's deadline pass while it trains: that round's noisy gradients were never
    counted (its ledger entry stays pending), so they must not move the next released update through Adam."""
    import client.round
    from client.optimizer_state import state_file

    job, job_id = hostile_job(slice_labels, model_dir), "job-00000000000000af"
    assert not institution.round(job, server_round=1, job_id=job_id).has_error()
    path = state_file(institution.state, institution.dataset, job_id)
    after_first, saved = adam_steps(path), path.read_bytes()
    checks = []

    def deadline_passes_during_training(msg, server_round):
        checks.append(server_round)
        if len(checks) == 2:  # the check after training
            raise m.Refused(m.Reason.DEADLINE_PASSED, "passed during training")

    monkeypatch.setattr(client.round, "check_deadline", deadline_passes_during_training)
    assert refusal(institution.round(job, server_round=2, job_id=job_id)).reason == m.Reason.DEADLINE_PASSED
    assert path.read_bytes() == saved and adam_steps(path) == after_first
    pending = institution.ledger.releases(institution.dataset, include_pending=True)
    assert len(pending) == 2 and len(institution.ledger.releases(institution.dataset)) == 1
