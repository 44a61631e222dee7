"""Which records an institution trains on.

A deployed institution names its own file (`data-path` in its node config). A simulated one
holds the `partition-id`-th share of the job's training file, split non-IID with the job's
seed, so every simulated institution computes the same split on its own.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import DataConfig, JobConfig, NodeConfig
from common.data import Records, file_fingerprint, read_job_records
from common.partition import dirichlet_partition


@dataclass(frozen=True, eq=False)
class LocalData:
    """Hashed by identity: loaders below return the same object for the same data."""

    name: str
    records: Records
    labels: torch.Tensor  # label ids in the job's label order
    sha256: str  # the records' contents, recorded with every release


def load_local_data(job: JobConfig, node: NodeConfig) -> LocalData:
    """Raises common.data.DataError (with the file's details: for the institution's log only)."""
    data = job.data
    if node.data_path is not None:
        return _whole_file(str(node.data_path), data.model_dump_json(), node.institution)
    return _simulated_share(job.model_dump_json(include={"data", "federation"}), node.partition_id,
                            node.num_partitions, node.institution)


def label_ids(records: Records, labels: list[str]) -> list[int]:
    """Free-text responses (a causal LM job with no label set) all count as one label."""
    return records.label_ids(labels) if labels else [0] * len(records)


@functools.lru_cache(maxsize=2)
def _whole_file(path: str, data_json: str, name: str) -> LocalData:
    data = DataConfig.model_validate_json(data_json)
    records = read_job_records(Path(path), data)
    return LocalData(name, records, torch.tensor(label_ids(records, data.labels)), file_fingerprint(Path(path)))


@functools.lru_cache(maxsize=8)
def _simulated_share(job_json: str, partition: int, partitions: int, name: str) -> LocalData:
    job = JobConfig.model_validate_json(job_json)
    records = read_job_records(job.data.train_path, job.data)
    ids = label_ids(records, job.data.labels)
    fed = job.federation
    shares = dirichlet_partition(ids, partitions, fed.alpha, fed.seed, fed.min_examples)
    share = shares[partition]
    digest = hashlib.sha256(file_fingerprint(job.data.train_path).encode())
    digest.update(",".join(map(str, share)).encode())
    return LocalData(name, records.subset(share), torch.tensor([ids[i] for i in share]), digest.hexdigest())
