"""`task = "causal_lm"`: a decoder LLM (AutoModelForCausalLM) with LoRA on its top layers, trained on
prompt/response records with the loss on the response tokens only.

Only the top `trainable_layers` layers carry adapters, so the layers below run once per party over
its records and are cached (common/models/features.py), as for the encoder; with
`trainable_layers` equal to the model's layer count only the embeddings are cached. The family's
own forward runs the top layers (its masks, rotary embeddings and final norm), on a view of the
model that holds only those layers, with the cached hidden states put in front of the first one.
The LM head runs only at response positions: a label's few tokens, not the whole vocabulary times
every prompt token. What travels is the LoRA A/B; the base model never does.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import string
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from common.config import ModelConfig
from common.data import Records
from common.model_files import ModelError, model_digest
from common.models.features import IGNORE, Features, cached, features_key, frozen_features
from common.models.loading import load_tokenizer, model_path, take_loaded


class _Stop(Exception):
    """Raised by a hook once the frozen part's output is captured: the rest need not run."""


def load_pretrained(path: str) -> PreTrainedModel:
    """Loaded afresh for each model built (seconds): a cached copy to deep-copy from would hold a
    second copy of an LLM's weights in every process."""
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load a transformers causal LM ({exc})") from None
    _layers(model)
    return model


def _layers(causal: PreTrainedModel) -> nn.ModuleList:
    """The decoder's stack of layers (`.layers` in Llama/Qwen/Mistral/Gemma/Phi, `.h` in GPT-2)."""
    inner = causal.base_model
    count = causal.config.num_hidden_layers
    for name in ("layers", "h"):
        stack = getattr(inner, name, None)
        if isinstance(stack, nn.ModuleList) and len(stack) == count:
            return stack
    raise ModelError(f"{type(causal).__name__}: task 'causal_lm' needs a decoder with a .layers or .h stack of "
                     f"{count} layers (Llama, Qwen2/3, Mistral, Gemma, Phi, GPT-2)")


class CausalLM(nn.Module):
    """A peft LoRA causal LM; `backbone` as for the encoder's classifier, so export treats both alike."""

    def __init__(self, backbone: PeftModel):
        super().__init__()
        self.backbone = backbone

    @property
    def causal(self) -> PreTrainedModel:
        return self.backbone.base_model.model

    @property
    def layers(self) -> nn.ModuleList:
        return _layers(self.causal)


def _frozen_count(model: CausalLM, config: ModelConfig) -> int:
    return len(model.layers) - config.trainable_layers


def build_model(config: ModelConfig, labels: list[str], device: torch.device, seed: int = 0) -> CausalLM:
    """A fresh LoRA causal LM; the same seed gives the same initial weights on every party.
    `labels` is unused: a label is generated as text."""
    path = model_path(config)
    base = take_loaded(config)
    if base is None:
        base = load_pretrained(path)
    layers = len(_layers(base))
    if config.trainable_layers > layers:
        raise ModelError(f"model.trainable_layers={config.trainable_layers} but {path} has {layers} layers")
    present = {name.rpartition(".")[2] for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    present |= {name.rpartition(".")[2] for name, module in base.named_modules() if type(module).__name__ == "Conv1D"}
    targets = [name for name in config.lora_modules if name in present and name != "lm_head"]
    if not targets:
        raise ModelError(f"{path}: none of model.lora_targets {config.lora_modules} is a projection of this model")
    # Move before wrapping: peft adapters created on the CPU and moved later break
    # Opacus' per-sample gradients (opacus issue 820).
    base.to(device)
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, layers_to_transform=list(range(layers - config.trainable_layers, layers)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalLM(get_peft_model(base, lora)).to(device)


def _render(tokenizer, turns, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in turns],
                                         tokenize=False, add_generation_prompt=generation_prompt)


def _templated(tokenizer, config: ModelConfig) -> bool:
    return bool(config.chat_template and getattr(tokenizer, "chat_template", None))


def _prompt_text(tokenizer, config: ModelConfig, turns) -> tuple[str, list[tuple[int, int]]]:
    """The prompt as text, and the character span of each earlier assistant turn's content in it."""
    if not _templated(tokenizer, config):
        text, spans, at = "\n".join(content for _, content in turns), [], 0
        for role, content in turns:
            if role == "assistant":
                spans.append((at, at + len(content)))
            at += len(content) + 1
        return text, spans
    if config.system_prompt and turns[0][0] != "system":
        turns = (("system", config.system_prompt), *turns)
    text, spans = _render(tokenizer, turns, True), []
    for k, (role, content) in enumerate(turns):
        if role == "assistant":
            before = _render(tokenizer, turns[:k], True) if k else ""
            found = text.find(content, len(before)) if text.startswith(before) else -1
            if found < 0:
                raise ModelError(f"{tokenizer.name_or_path}: its chat template does not render a conversation as the "
                                 "sum of its turns; chat records with several assistant turns cannot be masked")
            spans.append((found, found + len(content)))
    return text, spans


def prompt_tokens(tokenizer, config: ModelConfig, records: Records, i: int) -> tuple[list[int], list[int]]:
    """Record i's prompt as tokens (in the model's chat template when it has one and the job wants
    it), and the positions of the tokens that train in it: each earlier assistant turn's content
    and, where the template ends the turn with it, the end-of-sequence token right after."""
    text, spans = _prompt_text(tokenizer, config, records.prompt(i))
    special = not _templated(tokenizer, config)
    if not spans:  # offsets need a fast tokenizer: asked for only where a turn is to be found
        return tokenizer(text, add_special_tokens=special)["input_ids"], []
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, trained = encoded["input_ids"], []
    for start, end in spans:
        inside = [j for j, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and start <= a and b <= end]
        if inside and inside[-1] + 1 < len(ids) and ids[inside[-1] + 1] == tokenizer.eos_token_id:
            inside.append(inside[-1] + 1)
        trained += inside
    return ids, trained


def prompt_ids(tokenizer, config: ModelConfig, records: Records, i: int) -> list[int]:
    """Record i's prompt as tokens: what generation starts from."""
    return prompt_tokens(tokenizer, config, records, i)[0]


def tokenize(tokenizer, config: ModelConfig, records: Records) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, next-token targets) per record: a target is IGNORE except where the next token
    belongs to an assistant turn: the response, which ends with the end-of-sequence token so that
    generation stops, and a chat's earlier assistant turns. System and user tokens never train."""
    eos = tokenizer.eos_token_id
    all_ids, all_targets = [], []
    for i in range(len(records)):
        prompt, trained = prompt_tokens(tokenizer, config, records, i)
        response = tokenizer(records.labels[i], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        response = response[: config.max_length - 1]
        cut = max(0, len(prompt) - (config.max_length - len(response)))  # a long prompt loses its beginning
        prompt = prompt[cut:]
        targets = [IGNORE] * (len(prompt) - 1) + response + [IGNORE]
        for j in (j - cut for j in trained if j - cut >= 1):
            targets[j - 1] = prompt[j]
        all_ids.append(prompt + response)
        all_targets.append(targets)
    return all_ids, all_targets


def _capture_input(layer: nn.Module, captured: list):
    def hook(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    return layer.register_forward_pre_hook(hook, with_kwargs=True)


def _frozen_forward(model: CausalLM, frozen: int, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token ids -> the input of the first adapted layer, by the family's own forward."""
    captured: list = []
    handle = _capture_input(model.layers[frozen], captured)
    try:
        model.causal.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def encode(model: CausalLM, config: ModelConfig, records: Records, cache_dir: Path | None = None) -> Features:
    """The frozen layers over every record's prompt and response, with the response targets; cached
    by model (its folder and the digest of its files), length limit, split point and the tokens."""
    tokenizer = load_tokenizer(model_path(config))
    ids, targets = tokenize(tokenizer, config, records)
    frozen = _frozen_count(model, config)
    settings = f"decoder|{model_path(config)}|{model_digest(model_path(config))}|{config.max_length}|{frozen}"

    def compute() -> Features:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        features = frozen_features(functools.partial(_frozen_forward, model, frozen), ids, device, targets)
        model.train(was_training)
        return features

    keys = [",".join(map(str, record)) + "|" + ",".join(map(str, target)) for record, target in zip(ids, targets)]
    return cached(features_key(settings, keys), compute, cache_dir)


class UpperStack(nn.Module):
    """The adapted top layers, final norm and LM head, fed with `Features` instead of token ids.

    `view` is the family's own inner model (masks, rotary embeddings, final norm) holding only the
    top layers; it shares every parameter with the model it was made from, so training it trains
    that model (Opacus hooks every path to a module: only the view's path reaches the adapters).
    A hook, there only while it runs, puts the cached hidden states in front of its first
    layer (whatever the family does to `inputs_embeds` first: Gemma's scaling, GPT-2's positions).
    """

    def __init__(self, model: CausalLM, config: ModelConfig):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: each adapter reachable by one path
        inner = model.causal.base_model
        stack = "layers" if isinstance(getattr(inner, "layers", None), nn.ModuleList) else "h"
        top = nn.ModuleList(list(model.layers)[_frozen_count(model, config) :])
        view = copy.copy(inner)  # a shallow copy: the same parameters, its own list of submodules
        view._modules = dict(inner._modules)
        view._modules[stack] = top
        self.view = view
        object.__setattr__(self, "top", top)  # reached through the view only
        self.lm_head = model.causal.get_output_embeddings()

    @contextlib.contextmanager
    def checkpointed(self, recomputing: AbstractContextManager) -> Iterator[None]:
        """Gradient checkpointing of the adapted layers while open: each keeps only its input and
        recomputes the rest in the backward pass. Torch's non-reentrant checkpoint, inside the
        layer's `forward` (transformers keeps module hooks outside it); each recomputation runs
        in `recomputing`, where Opacus must not capture the adapters' inputs a second time. It is
        entered once per backward pass (ghost clipping has two), so it must be reusable."""
        if not all(isinstance(layer, GradientCheckpointingLayer) for layer in self.top):
            raise ModelError(f"training.gradient_checkpointing: {type(self.top[0]).__name__} layers cannot checkpoint")
        run = functools.partial(checkpoint, use_reentrant=False,
                                context_fn=lambda: (contextlib.nullcontext(), recomputing))
        for layer in self.top:
            layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, run
        try:
            yield
        finally:
            for layer in self.top:
                layer.gradient_checkpointing = False

    def hidden(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The final norm's output for cached hidden states."""

        def put_cached(module, args, kwargs):
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.top[0].register_forward_pre_hook(put_cached, with_kwargs=True)
        try:
            return self.view(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            handle.remove()

    def token_losses(self, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor):
        """(loss of each assistant token, its record, its logits' argmax == target)."""
        picked = targets != IGNORE
        logits = self.lm_head(self.hidden(hidden, mask)[picked]).float()
        wanted = targets[picked]
        losses = nn.functional.cross_entropy(logits, wanted, reduction="none")
        return losses, picked.nonzero()[:, 0], logits.argmax(dim=-1) == wanted

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, labels=None) -> torch.Tensor:
        """Each record's mean loss over its response tokens: what DP-SGD clips per record."""
        losses, rows, _ = self.token_losses(hidden, mask, targets)
        total = torch.zeros(len(hidden), device=hidden.device, dtype=losses.dtype).index_add(0, rows, losses)
        return total / (targets != IGNORE).sum(dim=1).clamp(min=1)


def normalise(text: str) -> str:
    """For exact match: case, surrounding punctuation and runs of whitespace do not count."""
    return re.sub(r"\s+", " ", text.strip().strip(string.punctuation + " ").lower())


@torch.no_grad()
def evaluate(upper: UpperStack, features: Features, labels=None, records: Records | None = None,
             label_set: list[str] | None = None, batch_size: int = 64) -> dict[str, float]:
    """Held-out loss (mean over response tokens), perplexity, and accuracy: the share of records
    whose response greedy generation reproduces exactly (for labels, the label's name).

    Greedy decoding reproduces a response token for token exactly when every response token is
    its position's argmax under teacher forcing (the end token included, so generation stops
    there): a record counts as correct when that holds, which is what generating and comparing
    would give, without generating (tests/test_llm.py pins the equivalence). A chat with several
    assistant turns counts as correct when every turn is reproduced from the conversation before it.
    """
    device = next(upper.parameters()).device
    upper.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    for rows in features.in_batches(batch_size):
        losses, record, hit = upper.token_losses(*features.batch(rows, device))
        loss_sum += float(losses.sum())
        tokens += len(losses)
        missed = torch.zeros(len(rows), dtype=torch.long, device=device).index_add(0, record, (~hit).long())
        correct += int((missed == 0).sum())
    upper.train()
    loss = loss_sum / max(tokens, 1)
    return {"accuracy": correct / len(features), "loss": loss, "perplexity": float(torch.exp(torch.tensor(loss)))}


@torch.no_grad()
def samples(model: CausalLM, config: ModelConfig, records: Records, count: int,
            labels: list[str] | None = None) -> list[dict[str, str]]:
    """Greedy generations for the first `count` records: prompt, expected response, generated text."""
    tokenizer = load_tokenizer(model_path(config))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    samples = []
    for i in range(min(count, len(records))):
        ids = torch.tensor([prompt_ids(tokenizer, config, records, i)[-config.max_length :]], device=device)
        out = model.backbone.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=config.max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": records.texts[i], "expected": records.labels[i], "generated": text})
    model.train(was_training)
    return samples
