"""The whole job through Flower's simulation engine: real model, real data slice, real Opacus."""

import json
import subprocess
import sys

import pytest
import torch

from client.privacy.ledger import LEDGER_FILE, PrivacyLedger
from common.accounting import epsilon
from common.data import read_records
from common.models.export import load_saved_model
from common.models.loading import load_tokenizer
from simulations.cli import main


@pytest.fixture(scope="module")
def finished_run(banking_slice, tmp_path_factory):
    train, test = banking_slice
    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "--train", str(train), "--test", str(test), "--institutions", "2", "--rounds", "2",
            "--batch-size", "48", "--alpha", "1.0", "--epsilon", "8", "--out", str(out),
        ]
    )
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_run_folder_is_complete(finished_run):
    out, _ = finished_run
    for name in ("metrics.json", "report.md", "privacy.json", "privacy.md", "accuracy.png", "epsilon.png", "model/labels.txt",
                 "model/adapter_config.json", "model/adapter_model.safetensors", "model/head.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "accuracy.png").stat().st_size > 5000


def test_every_institution_trained_every_round_within_budget(finished_run):
    _, metrics = finished_run
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert len(metrics["institutions"]) == 2
    for inst in metrics["institutions"]:
        assert inst["rounds"] == 2
        assert 0 < inst["epsilon"] <= 8.0
        assert inst["epsilon_per_round"]["1"] < inst["epsilon_per_round"]["2"]
        assert inst["noise_multiplier"] > 0 and 0 < inst["sample_rate"] <= 1
        assert inst["bytes_up"] > 0 and inst["bytes_down"] > 0


def test_privacy_report_names_accountant_delta_and_every_institution(finished_run):
    out, metrics = finished_run
    report = json.loads((out / "privacy.json").read_text())
    assert [i["name"] for i in report["institutions"]] == ["institution-1", "institution-2"]
    for inst in report["institutions"]:
        assert inst["accountant"] == "prv" and inst["delta"] == 1e-5
        assert inst["epsilon"] == inst["dataset_epsilon"] <= inst["granted_epsilon"] == inst["budget_epsilon"] == 8.0
    assert "PRV (Opacus PRVAccountant)" in (out / "privacy.md").read_text()


def test_ledgers_hold_what_the_report_says(finished_run):
    out, metrics = finished_run
    for inst in metrics["institutions"]:
        ledger = PrivacyLedger(out / "institutions" / inst["name"] / LEDGER_FILE)
        (dataset,) = [d.id for d in ledger.datasets()]
        assert ledger.spent(dataset) == pytest.approx(inst["dataset_epsilon"], rel=1e-6)
        assert [r.round for r in ledger.releases(dataset)] == [1, 2]


def test_budget_command_shows_spent_and_remaining(finished_run):
    out, metrics = finished_run
    inst = metrics["institutions"][0]
    result = subprocess.run(
        [sys.executable, "-m", "client.cli", "budget", "--state-dir", str(out / "institutions" / inst["name"]), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    (row,) = json.loads(result.stdout)
    assert row["spent_epsilon"] == pytest.approx(inst["dataset_epsilon"], rel=1e-6)
    assert row["remaining_epsilon"] == pytest.approx(8.0 - inst["dataset_epsilon"], rel=1e-6)
    assert row["accountant"] == "prv" and list(row["jobs"].values()) == [[1, 2]]


def test_a_second_job_on_a_spent_budget_is_declined(finished_run, banking_slice, tmp_path):
    """Budgets outlive jobs: the same institutions, the same data, no budget left."""
    out, first = finished_run
    train, test = banking_slice
    code = main(
        [
            "--train", str(train), "--test", str(test), "--institutions", "2", "--rounds", "2",
            "--batch-size", "48", "--epsilon", "8", "--out", str(tmp_path / "again"),
            "--state-dir", str(out / "institutions"),
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    # Nobody released anything, and the report still has a row for every institution that declined.
    assert [(i["name"], i["rounds"], i["declined_rounds"], i["epsilon"]) for i in metrics["institutions"]] == [
        ("institution-1", 0, [1, 2], 0.0), ("institution-2", 0, [1, 2], 0.0)
    ]
    assert "| institution-1 | - | 8 / - | 0.0000 | - / - |" in (tmp_path / "again" / "privacy.md").read_text()
    for rnd in metrics["rounds"][1:]:
        assert sorted(rnd["declined"]) == ["institution-1", "institution-2"]
        assert set(rnd["declined"].values()) == {"budget-spent"}  # a reason code, never free text
    assert metrics["rounds"][-1]["accuracy"] == metrics["rounds"][0]["accuracy"]  # the model did not move
    for inst in first["institutions"]:
        ledger = PrivacyLedger(out / "institutions" / inst["name"] / LEDGER_FILE)
        assert ledger.spent(ledger.datasets()[0].id) <= 8.0


def test_global_model_learned(finished_run):
    _, metrics = finished_run
    first, last = metrics["rounds"][0], metrics["rounds"][-1]
    assert last["loss"] < first["loss"]  # the untrained head predicts uniformly: loss = ln(labels)
    assert last["accuracy"] > first["accuracy"]


def test_exported_model_reproduces_the_reported_accuracy(finished_run, banking_slice):
    out, metrics = finished_run
    model, labels = load_saved_model(out / "model")
    test = read_records(banking_slice[1], "text", "category")
    tokenizer = load_tokenizer(str(out / "model"))
    batch = tokenizer(test.texts, truncation=True, max_length=metrics["config"]["model"]["max_length"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**batch).argmax(dim=1)
    accuracy = float((predicted == torch.tensor(test.label_ids(labels))).float().mean())
    assert accuracy == pytest.approx(metrics["rounds"][-1]["accuracy"], abs=0.02)


def test_bad_data_file_fails_before_training_with_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,category\nhello,card_arrival\n,card_arrival\n")
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "--train", str(bad), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert f"{bad}: row 3: column 'text' is empty" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_an_institution_not_asked_for_a_round_releases_nothing(banking_slice, tmp_path):
    """Client sampling with SecAgg+: 2 of 3 institutions per round, the batch following each one's size.
    Each is asked for 2 of the 3 rounds, plans its noise for those 2, and its ledger holds exactly the
    rounds it was asked for, at an epsilon its accountant computes over that history."""
    train, test = banking_slice
    out = tmp_path / "sampled"
    code = main(["--train", str(train), "--test", str(test), "--institutions", "3", "--rounds", "3",
                 "--fraction-per-round", "0.6", "--epsilon", "8", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    asked = {r["round"]: r["asked"] for r in metrics["rounds"][1:]}
    assert [len(names) for names in asked.values()] == [2, 2, 2]
    assert all(r["took_part"] == r["asked"] for r in metrics["rounds"][1:])
    for inst in metrics["institutions"]:
        ledger = PrivacyLedger(out / "institutions" / inst["name"] / LEDGER_FILE)
        (dataset,) = [d.id for d in ledger.datasets()]
        released = [r.round for r in ledger.releases(dataset, include_pending=True)]
        assert released == [rnd for rnd, names in asked.items() if inst["name"] in names] and len(released) == 2
        (grant,) = ledger.grants(dataset).values()
        assert grant.plan.rounds == 2 and grant.plan.sample_rate == inst["sample_rate"] < 1
        assert ledger.spent(dataset) == pytest.approx(epsilon(ledger.history(dataset), 1e-5, "prv"), rel=1e-9)
        assert ledger.spent(dataset) == pytest.approx(inst["dataset_epsilon"], rel=1e-6) and inst["epsilon"] <= 8.0
