"""`task = "classification"`: a frozen BERT-family encoder with LoRA on its upper layers, mean
pooling and a linear head.

Two adapter placements (`ModelConfig.adapt`): `top_ffn_output`, LoRA on the last layer's
feed-forward output projection only, and `top_layers`, `lora_targets` in the top
`trainable_layers` layers. Either way everything below the adapters is frozen and cached
(common/models/features.py). What travels is the LoRA A/B and the head.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from common.config import ModelConfig
from common.data import Records
from common.model_files import ModelError, model_digest
from common.models.features import Features, cached, features_key, frozen_features
from common.models.loading import load_tokenizer, model_path, take_loaded


def _check_encoder(backbone: PreTrainedModel) -> None:
    if not (hasattr(backbone, "embeddings") and hasattr(getattr(backbone, "encoder", None), "layer")):
        raise ModelError(
            f"{type(backbone).__name__}: task 'classification' needs an encoder with .embeddings and "
            ".encoder.layer (BERT, RoBERTa, ELECTRA, XLM-R family); for a decoder use task 'causal_lm'"
        )


def load_pretrained(path: str) -> PreTrainedModel:
    """A fresh copy from disk each time: loading (memory-mapped safetensors) is faster than
    deep-copying a cached one, and each model gets adapters injected into its own copy."""
    try:
        backbone = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a transformers encoder ({exc})") from None
    _check_encoder(backbone)
    return backbone


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
    backbone = take_loaded(config)
    if backbone is None:
        backbone = load_pretrained(path)
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
            "target_modules": config.lora_modules,
            "layers_to_transform": list(range(layers - config.trainable_layers, layers)),
        }
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, **targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TextClassifier(get_peft_model(backbone, lora), len(labels)).to(device)
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model


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


def encode(model: TextClassifier, config: ModelConfig, records: Records, cache_dir: Path | None = None) -> Features:
    """The frozen part of the model over the records' texts, cached by model (its folder and the
    digest of its files), length limit, split point and the texts themselves."""
    settings = (f"encoder|{model_path(config)}|{model_digest(model_path(config))}|{config.max_length}|{config.adapt}|"
                f"{config.trainable_layers}")

    def compute() -> Features:
        tokens = load_tokenizer(model_path(config))(records.texts, truncation=True, max_length=config.max_length)
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        features = frozen_features(functools.partial(_frozen_forward, model, config), tokens["input_ids"], device)
        model.train(was_training)
        return features

    return cached(features_key(settings, records.texts), compute, cache_dir)


class UpperStack(nn.Module):
    """The trainable end of a `TextClassifier`, fed with `Features` instead of token ids.

    It shares every parameter with the classifier it was made from, so training it trains
    that classifier. Its submodules are only the top layers and the head, each reachable by one
    path: Opacus hooks every path to a module, and a second one doubled each per-record gradient.
    """

    def __init__(self, model: TextClassifier, config: ModelConfig):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: see above
        self.adapt = config.adapt
        layers = model.encoder.encoder.layer
        top = 1 if config.adapt == "top_ffn_output" else config.trainable_layers
        self.layers = nn.ModuleList(layers[len(layers) - top :])
        self.head = model.head

    def logits(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.adapt == "top_ffn_output":
            hidden = self._adapted_ffn_output(hidden)
        else:
            hidden = _run_layers(self.layers, self.model.encoder.config, hidden, mask)
        return self.model.classify(hidden, mask)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each record's cross-entropy: what DP-SGD clips per record."""
        return nn.functional.cross_entropy(self.logits(hidden, mask), labels, reduction="none")

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
def samples(model: TextClassifier, config: ModelConfig, records: Records, count: int,
            labels: list[str]) -> list[dict[str, str]]:
    """The predicted labels of the first `count` records: text, expected label, predicted label."""
    tokenizer = load_tokenizer(model_path(config))
    device = next(model.parameters()).device
    shown = records.subset(range(min(count, len(records))))
    batch = tokenizer(shown.texts, truncation=True, max_length=config.max_length, padding=True, return_tensors="pt")
    was_training = model.training
    model.eval()
    predicted = model(**batch.to(device)).argmax(dim=1).tolist()
    model.train(was_training)
    return [{"prompt": t, "expected": e, "generated": labels[p]} for t, e, p in zip(shown.texts, shown.labels, predicted)]


@torch.no_grad()
def evaluate(upper: UpperStack, features: Features, labels: torch.Tensor, records: Records | None = None,
             label_set: list[str] | None = None, batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the model on cached features (records, label_set: unused)."""
    device = next(upper.parameters()).device
    upper.eval()
    correct, loss_sum = 0, 0.0
    for rows in features.in_batches(batch_size):
        logits = upper.logits(*features.batch(rows, device))
        target = labels[rows].to(device)
        loss_sum += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    upper.train()
    return {"accuracy": correct / len(features), "loss": loss_sum / len(features)}
