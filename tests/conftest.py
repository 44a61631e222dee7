"""Shared fixtures: small slices of the real BANKING77 files and the real packaged model."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.config import BANKING77, ModelConfig

# Real coordinator/institution process fixtures (coordinator, federation, ...) for any test module.
pytest_plugins = ["deployment_support"]

SLICE_LABELS = 6
# Modules that start Flower's simulation engine (Ray).
SIMULATION_MODULES = {"test_simulation", "test_llm", "test_secure_aggregation", "test_institution_dp", "test_console", "test_local_surfaces",
                      "test_resume"}


# The groups that take longest (seconds on 2 cores, 2026-12-04: simulation 385, daemon kill 281,
# deployment 246, then 90-125 each), handed out first so that no long one starts last.
LONGEST_FIRST = ("simulation", "test_daemon_kill", "test_deployment", "test_serverapp_failure", "test_voided_round",
                 "test_approval", "test_coordinator_restart")


def group_of(module: str) -> str:
    return "simulation" if module in SIMULATION_MODULES else module


def _group(item: pytest.Item) -> str:
    return group_of(item.module.__name__.rpartition(".")[2])


def pytest_itemcollected(item):
    """`make test` runs two pytest workers (`-n 2 --dist loadgroup --no-loadscope-reorder`). Each
    module stays on one worker, so its module fixtures (a coordinator and its institutions) start
    once; the modules that start a Ray simulation share one worker, so that two Rays never compete
    for the cores. (Marked here, before xdist's collection hook reads the marks into the test ids.)"""
    item.add_marker(pytest.mark.xdist_group(_group(item)))


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture, which would undo it
def pytest_collection_modifyitems(items):
    """xdist hands the groups out in the order of `items`: the longest first."""
    rank = {group: index for index, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: a module's order is kept


def write_slice(source: Path, target: Path, labels: list[str], per_label: int) -> Path:
    with source.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    taken: Counter[str] = Counter()
    kept = []
    for row in rows:
        if row["category"] in labels and taken[row["category"]] < per_label:
            taken[row["category"]] += 1
            kept.append(row)
    with target.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(kept)
    return target


@pytest.fixture(scope="session")
def slice_labels() -> list[str]:
    with (BANKING77 / "train.csv").open(encoding="utf-8", newline="") as handle:
        return sorted({row["category"] for row in csv.DictReader(handle)})[:SLICE_LABELS]


@pytest.fixture(scope="session")
def banking_slice(tmp_path_factory, slice_labels) -> tuple[Path, Path]:
    """(train, test) CSV files: a few real BANKING77 intents, a few dozen records each."""
    folder = tmp_path_factory.mktemp("banking_slice")
    train = write_slice(BANKING77 / "train.csv", folder / "train.csv", slice_labels, 40)
    test = write_slice(BANKING77 / "test.csv", folder / "test.csv", slice_labels, 15)
    return train, test


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Feature caches of the tests never mix with a user's own cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("fedtune-cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


@pytest.fixture(
    scope="session",
    params=[
        {"adapt": "top_ffn_output"},
        {"adapt": "top_layers", "trainable_layers": 2, "lora_targets": ["query", "value", "dense"]},
    ],
    ids=["top_ffn_output", "top_layers"],
)
def model_config(request) -> ModelConfig:
    """Both ways of placing the adapters, on the real packaged model."""
    return ModelConfig(max_length=32, lora_rank=4, **request.param)
