"""The final model as a portable folder: a peft adapter, the tokenizer, and what the kind adds.

Portable means no path of the machine that wrote it: `adapter_config.json` names the base model
by its public name (`base_name`), and `load_saved_model` finds that base where this machine's
packages keep it. The saved tokenizer truncates at the job's `max_length`.
"""

from __future__ import annotations

import json
from pathlib import Path

from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from common.config import ModelConfig
from common.model_files import base_name, resolve_base
from common.models.loading import load_tokenizer, model_path

HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.txt"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged"


def save_model(model, config: ModelConfig, labels: list[str], folder: Path, merge: bool = False) -> None:
    """LoRA adapter (peft format), tokenizer, label map, the classifier's head (safetensors) if it
    has one, and with `merge` a full model with the adapter merged in (`folder/merged`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder)
    adapter = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    adapter["base_model_name_or_path"] = base_name(model_path(config))
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(model_path(config))
    saved_length = tokenizer.model_max_length
    tokenizer.model_max_length = config.max_length
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.model_max_length = saved_length  # the cached tokenizer is shared in this process
    (folder / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    head = getattr(model, "head", None)
    if head is not None:
        save_file({"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()}, folder / HEAD_FILE)
    if merge:
        merge_model(folder, base=model_path(config))


def merge_model(folder: Path, base: str | None = None) -> Path:
    """Write `folder/merged`: the base model with the adapter merged in, and the tokenizer, a plain
    Hugging Face model folder (`AutoModelForCausalLM`/`AutoModel.from_pretrained`). A classifier's
    head stays in `head.safetensors`."""
    folder = Path(folder)
    base_path = base or resolve_base(LoraConfig.from_pretrained(folder).base_model_name_or_path)
    backbone = _base_class(folder).from_pretrained(base_path, local_files_only=True)
    merged = PeftModel.from_pretrained(backbone, folder).merge_and_unload()
    merged.save_pretrained(folder / MERGED_DIR)
    load_tokenizer(str(folder)).save_pretrained(folder / MERGED_DIR)
    return folder / MERGED_DIR


def _base_class(folder: Path):
    task_type = LoraConfig.from_pretrained(folder).task_type
    return AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel


def load_saved_model(folder: Path, device: str = "cpu", base: str | None = None):
    """An exported model and its labels: a classifier ready for `model(**tokenizer(texts, ...))`,
    or a causal LM's peft model ready for `generate`. `base`: the base model's folder, when this
    machine's packages do not hold it."""
    from common.models.encoder import TextClassifier  # the kind that has a head

    folder = Path(folder)
    labels = (folder / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    base_path = base or resolve_base(LoraConfig.from_pretrained(folder).base_model_name_or_path)
    backbone = _base_class(folder).from_pretrained(base_path, local_files_only=True).to(device)
    peft = PeftModel.from_pretrained(backbone, folder)
    if not (folder / HEAD_FILE).is_file():
        return peft.to(device).eval(), labels
    model = TextClassifier(peft, len(labels))
    model.head.load_state_dict(load_file(folder / HEAD_FILE))
    return model.to(device).eval(), labels

