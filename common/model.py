"""The classifier every party shares: a frozen transformers encoder with LoRA on its upper layers.

Only the upper `trainable_layers` carry trainable weights, so the lower layers' output never
changes during a job. Each party therefore runs the lower layers once over its texts
(`encode`), and trains and evaluates the `UpperStack` on those cached hidden states: the same
function as the whole model, at a fraction of the cost, which is what makes DP-SGD with large
Poisson batches affordable on a CPU.

What travels between parties is `trainable_state`: the LoRA adapters and the head. The frozen base never travels.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from common.config import ModelConfig
from common.model_files import ModelError, packaged_model_path

ENCODE_BATCH = 128
FEATURES_FORMAT = 2  # bump when what `encode` caches changes meaning


def model_path(config: ModelConfig) -> str:
    return config.path or packaged_model_path()


def pick_device(requested: str) -> torch.device:
    """'auto' takes the first CUDA device when one is present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"training.device={requested!r} but no CUDA device is available")
    return device


def _check_encoder(backbone: PreTrainedModel) -> None:
    if not (hasattr(backbone, "embeddings") and hasattr(getattr(backbone, "encoder", None), "layer")):
        raise ModelError(
            f"{type(backbone).__name__}: fedtune needs an encoder with .embeddings and .encoder.layer "
            "(BERT, RoBERTa, ELECTRA, XLM-R family)"
        )


@functools.lru_cache(maxsize=4)
def _load_backbone(path: str) -> PreTrainedModel:
    try:
        backbone = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a transformers encoder ({exc})") from None
    _check_encoder(backbone)
    return backbone


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class TextClassifier(nn.Module):
    """Encoder with LoRA adapters, mean pooling over real tokens, and a linear head.

    Mean pooling is how sentence encoders such as all-MiniLM-L6-v2 were trained, so the
    pooled vector is a good sentence representation from the first step on; a [CLS] pooler
    would have to be learnt, under DP noise, first.
    """

    def __init__(self, backbone: PeftModel, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    @property
    def encoder(self) -> PreTrainedModel:
        return self.backbone.base_model.model

    def classify(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)  # no dropout: DP noise already regularises

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **tokenizer_extras) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **tokenizer_extras).last_hidden_state
        return self.classify(hidden, attention_mask)


def build_model(config: ModelConfig, labels: list[str], device: torch.device, seed: int = 0) -> TextClassifier:
    """A fresh LoRA classifier; the same seed gives the same initial weights on every party."""
    path = model_path(config)
    backbone = copy.deepcopy(_load_backbone(path))
    layers = len(backbone.encoder.layer)
    if config.trainable_layers > layers:
        raise ModelError(f"model.trainable_layers={config.trainable_layers} but {path} has {layers} layers")
    # Move before wrapping: peft adapters created on the CPU and moved later break
    # Opacus' per-sample gradients (opacus issue 820).
    backbone.to(device)
    if config.adapt == "top_ffn_output":
        # A regex, matched against whole module names: only the last layer's FFN output projection.
        targets: dict = {"target_modules": rf".*\.layer\.{layers - 1}\.output\.dense"}
    else:
        targets = {
            "target_modules": config.lora_targets,
            "layers_to_transform": list(range(layers - config.trainable_layers, layers)),
        }
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, **targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextClassifier(get_peft_model(backbone, lora), len(labels)).to(device)
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of the weights that travel (on the CPU, the same tensors would alias the live ones)."""
    return OrderedDict((name, p.detach().cpu().clone()) for name, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelError(f"trainable weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def to_ndarrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The trainable weights as Flower's legacy workflow carries them: a list in the model's order."""
    return [value.numpy() for value in state.values()]


def from_ndarrays(names: list[str], arrays: list[np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    if len(names) != len(arrays):
        raise ModelError(f"expected {len(names)} trainable tensors, got {len(arrays)}")
    return OrderedDict((name, torch.from_numpy(np.asarray(array))) for name, array in zip(names, arrays))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


@dataclass
class Features:
    """What the frozen part of the model computes for a list of texts, one row per real token.

    Packed (no padding) because texts are short and uneven; `batch` pads only to the longest
    text of the records asked for. Rows are float32 so that batches need no conversion, with
    one zero row at the end that padding positions point at.
    """

    values: torch.Tensor  # [tokens of all texts + 1, width]
    lengths: torch.Tensor  # [records]

    @classmethod
    def pack(cls, per_text: list[torch.Tensor]) -> Features:
        width = per_text[0].shape[-1]
        values = torch.cat([*per_text, torch.zeros(1, width, dtype=per_text[0].dtype)])
        return cls(values.float(), torch.tensor([len(t) for t in per_text]))

    def __post_init__(self) -> None:
        self.values = self.values.float()
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [records, tokens, width], mask [records, tokens]) for `rows`."""
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 1
        positions = torch.arange(width)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
        index = torch.where(mask, self.offsets[rows].unsqueeze(1) + positions, len(self.values) - 1)
        return self.values[index].to(device), mask.long().to(device)


def _features_key(config: ModelConfig, texts: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(
        f"{FEATURES_FORMAT}|{model_path(config)}|{config.max_length}|{config.adapt}|{config.trainable_layers}".encode()
    )
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR", Path.home() / ".cache" / "fedtune"))


def encode(
    model: TextClassifier, config: ModelConfig, texts: list[str], cache_dir: Path | None = None
) -> Features:
    """Run the frozen part of the model over `texts` once; reuse the result from `cache_dir` if there.

    The cache is keyed by model, length limit, split point and the texts themselves, and is
    written atomically, so concurrent or killed writers never leave a half file behind.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "features" / f"{_features_key(config, texts)}.pt"
        if cache_file.is_file():
            return Features(**torch.load(cache_file))
    features = _run_frozen_part(model, config, texts)
    if cache_file is not None:
        # Hidden states of every record: owner only, whatever the umask of the process writing them.
        Path(cache_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        cache_file.parent.mkdir(mode=0o700, exist_ok=True)
        cache_file.parent.chmod(0o700)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.touch(mode=0o600)
        torch.save({"values": features.values.half(), "lengths": features.lengths}, tmp)
        os.replace(tmp, cache_file)
    return features


def _attention_mask(config, hidden: torch.Tensor, mask: torch.Tensor):
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)


def _run_layers(layers, config, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attention = _attention_mask(config, hidden, mask)
    for layer in layers:
        out = layer(hidden, attention_mask=attention)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _frozen_forward(model: TextClassifier, config: ModelConfig, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids -> the input of the first trainable module (see `ModelConfig.adapt`)."""
    encoder = model.encoder
    layers = encoder.encoder.layer
    frozen_layers = len(layers) - (1 if config.adapt == "top_ffn_output" else config.trainable_layers)
    hidden = _run_layers(layers[:frozen_layers], encoder.config, encoder.embeddings(input_ids=ids), mask)
    if config.adapt == "top_layers":
        return hidden
    # top_ffn_output: everything but the adapter's own contribution is fixed, including the
    # frozen projection itself, so cache its input and the pre-LayerNorm sum without the adapter.
    top = layers[-1]
    attended = top.attention(hidden, _attention_mask(encoder.config, hidden, mask))[0]
    inner = top.intermediate(attended)
    return torch.cat([inner, top.output.dense.base_layer(inner) + attended], dim=-1)


@torch.no_grad()
def _run_frozen_part(model: TextClassifier, config: ModelConfig, texts: list[str]) -> Features:
    tokens = load_tokenizer(model_path(config))(texts, truncation=True, max_length=config.max_length)["input_ids"]
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))  # similar lengths pad little
    per_text: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), ENCODE_BATCH):
        rows = order[start : start + ENCODE_BATCH]
        width = max(len(tokens[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(tokens[i])] = torch.tensor(tokens[i])
            mask[j, : len(tokens[i])] = 1
        out = _frozen_forward(model, config, ids.to(device), mask.to(device)).to("cpu", torch.float16)
        for j, i in enumerate(rows):
            per_text[i] = out[j, : len(tokens[i])]
    model.train(was_training)
    return Features.pack(per_text)


class UpperStack(nn.Module):
    """The trainable end of a `TextClassifier`, fed with `Features` instead of token ids.

    It shares every parameter with the classifier it was made from, so training it trains
    that classifier.
    """

    def __init__(self, model: TextClassifier, config: ModelConfig):
        super().__init__()
        self.model = model
        self.adapt = config.adapt
        layers = model.encoder.encoder.layer
        top = 1 if config.adapt == "top_ffn_output" else config.trainable_layers
        self.layers = nn.ModuleList(layers[len(layers) - top :])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.adapt == "top_ffn_output":
            hidden = self._adapted_ffn_output(hidden)
        else:
            hidden = _run_layers(self.layers, self.model.encoder.config, hidden, mask)
        return self.model.classify(hidden, mask)

    def _adapted_ffn_output(self, cached: torch.Tensor) -> torch.Tensor:
        """LayerNorm(frozen projection + residual + LoRA delta), the last layer's output.

        The layer's dropout is left out: the first two terms come from the cache, and DP noise
        already regularises training.
        """
        output = self.layers[-1].output
        projection = output.dense  # a peft LoRA Linear
        inner, fixed = cached.split([projection.in_features, cached.shape[-1] - projection.in_features], dim=-1)
        name = projection.active_adapters[0]
        lora_input = projection.lora_dropout[name](inner)
        delta = projection.lora_B[name](projection.lora_A[name](lora_input)) * projection.scaling[name]
        return output.LayerNorm(fixed + delta)


@torch.no_grad()
def evaluate(upper: UpperStack, features: Features, labels: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model on cached features."""
    device = next(upper.parameters()).device
    upper.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(features), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(features)))
        logits = upper(*features.batch(rows, device))
        target = labels[rows].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    upper.train()
    return {"accuracy": correct / len(features), "loss": loss_sum / len(features)}


HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.txt"


def save_model(model: TextClassifier, labels: list[str], folder: Path) -> None:
    """LoRA adapter (peft format), head (safetensors), tokenizer and label map."""
    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder)
    save_file({"weight": model.head.weight.detach().cpu(), "bias": model.head.bias.detach().cpu()}, folder / HEAD_FILE)
    load_tokenizer(model.backbone.peft_config["default"].base_model_name_or_path).save_pretrained(folder)
    (folder / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")


def load_saved_model(folder: Path, device: str = "cpu") -> tuple[TextClassifier, list[str]]:
    """An exported classifier, ready for `model(**tokenizer(texts, ...))`, and its labels."""
    folder = Path(folder)
    labels = (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    base = AutoModel.from_pretrained(LoraConfig.from_pretrained(folder).base_model_name_or_path).to(device)
    model = TextClassifier(PeftModel.from_pretrained(base, folder), len(labels))
    model.head.load_state_dict(load_file(folder / HEAD_FILE))
    return model.to(device).eval(), labels
