"""task 'causal_lm' on a tiny random Llama built here from a LlamaConfig (nothing downloaded)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from client.trainer import train_dp
from common.accounting import accountant_state, plan_noise, restore_accountant
from common.config import ModelConfig
from common.data import Records
from common.models.decoder import UpperStack, build_model, encode, evaluate, prompt_ids, samples, tokenize
from common.models.export import load_saved_model, save_model
from common.models.features import IGNORE
from common.models.loading import load_tokenizer
from common.models.transport import load_trainable_state, trainable_state

CPU = torch.device("cpu")
LABELS = ["card_arrival", "exchange_rate", "top_up_failed"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the test's words (a small vocabulary: a tiny model can learn it)."""
    words = ["question", "where", "is", "my", "card", "number", "exchange", ":", "<", ">", "user", "assistant", *LABELS]
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words, *map(str, range(30))])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 3-layer random Llama with a word-level tokenizer and a chat template; initialised wide, so that
    its adapters can make it confident (with 0.02, the frozen head caps every logit below 1)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _config(folder: Path, **settings) -> ModelConfig:
    return ModelConfig(task="causal_lm", path=str(folder), max_length=32, lora_rank=4, trainable_layers=2, **settings)


def _records(n: int = 24) -> Records:
    texts = [f"question {i}: where is my card number {i}" for i in range(n)]
    return Records(Path("x.csv"), texts, [LABELS[i % 3] for i in range(n)])


def _perturbed(model):
    generator = torch.Generator().manual_seed(0)
    load_trainable_state(model, {k: torch.randn(v.shape, generator=generator) * 0.3
                                 for k, v in trainable_state(model).items()})
    return model


def test_defaults_adapt_every_projection_of_the_top_layers_only(tiny_llama):
    config = _config(tiny_llama)
    assert config.adapt == "top_layers"
    names = list(trainable_state(build_model(config, LABELS, CPU)))
    assert all("lora_" in n for n in names)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in names}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(".layers.1." in n or ".layers.2." in n for n in names)


def test_loss_is_on_response_tokens_only_and_equals_the_whole_models(tiny_llama):
    """The cached split computes Hugging Face's own masked causal-LM loss, record by record."""
    config = _config(tiny_llama)
    model = _perturbed(build_model(config, LABELS, CPU)).eval()
    records = _records(6)
    tokenizer = load_tokenizer(str(tiny_llama))
    ids, targets = tokenize(tokenizer, config, records)
    for record_ids, record_targets, label in zip(ids, targets, records.labels):
        response = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert [t for t in record_targets if t != IGNORE] == response
        assert record_ids[-len(response):] == response
        assert record_targets[-1] == IGNORE
    features = encode(model, config, records)
    upper = UpperStack(model, config).eval()
    with torch.no_grad():
        split = upper(*features.batch(torch.arange(len(records)), CPU))
        for i, (record_ids, record_targets) in enumerate(zip(ids, targets)):
            labels = torch.tensor([IGNORE, *record_targets[:-1]])  # HF shifts labels itself
            whole = model.backbone(input_ids=torch.tensor([record_ids]), labels=labels.unsqueeze(0)).loss
            assert torch.allclose(split[i], whole, rtol=1e-3, atol=1e-3), (i, split[i], whole)  # fp16 cache
    prompt_only = Records(Path("x.csv"), records.texts, ["z"] * len(records))
    other = encode(model, config, prompt_only)
    assert not torch.allclose(upper(*other.batch(torch.arange(len(records)), CPU)), split)


@pytest.mark.parametrize("mode,physical", [("hooks", None), ("ghost", None), ("hooks", 5)])
def test_every_lora_tensor_moves_after_dp_steps(tiny_llama, mode, physical):
    """Opacus issue 820 for a decoder: every adapter tensor gets its per-record gradients."""
    config = _config(tiny_llama)
    model = build_model(config, LABELS, CPU)
    records = _records(24)
    features = encode(model, config, records)
    plan = plan_noise(records=24, batch_size=12, local_epochs=1.0, rounds=1, grant=8.0, budget=8.0, delta=1e-5,
                      accountant="prv")
    before = trainable_state(model)
    result = train_dp(
        UpperStack(model, config), features, torch.zeros(24, dtype=torch.long), plan, steps=plan.steps_per_round,
        max_grad_norm=1.0, learning_rate=0.05, adapter_learning_rate=0.01,
        accountant=restore_accountant(accountant_state([], "prv"), "prv"), grad_sample_mode=mode,
        physical_batch=physical,
    )
    assert result.history == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    after = trainable_state(model)
    assert any("lora_A" in n for n in before) and any("lora_B" in n for n in before)
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_accuracy_is_what_greedy_generation_gives(tiny_llama):
    """The teacher-forced exact match equals generating greedily and comparing token for token."""
    config = _config(tiny_llama, max_new_tokens=8)
    model = build_model(config, LABELS, CPU)
    train = _records(24)
    upper, features = UpperStack(model, config), encode(model, config, train)
    optimizer = torch.optim.Adam([p for p in upper.parameters() if p.requires_grad], lr=0.02)
    for _ in range(15):  # enough for the model to answer its training prompts with their labels
        optimizer.zero_grad()
        upper(*features.batch(torch.arange(24), CPU)).mean().backward()
        optimizer.step()
    probe = Records(Path("x.csv"), train.texts[:12], [LABELS[i % 3] if i % 2 else "exchange card" for i in range(12)])
    result = evaluate(upper, encode(model, config, probe), torch.zeros(12), probe, LABELS)
    tokenizer = load_tokenizer(str(tiny_llama))
    matched = []
    model.eval()
    for i in range(len(probe)):
        prompt = torch.tensor([prompt_ids(tokenizer, config, probe, i)])
        out = model.backbone.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer(probe.labels[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        matched.append(out[0, prompt.shape[1]:].tolist()[: len(expected)] == expected)
    by_generation = sum(matched) / len(matched)
    assert 0 < by_generation <= 0.5  # the wrong labels are never generated
    assert result["accuracy"] == pytest.approx(by_generation)
    assert result["perplexity"] == pytest.approx(float(torch.exp(torch.tensor(result["loss"]))))
    shown = samples(model, config, probe, 2)
    assert [s["expected"] for s in shown] == probe.labels[:2] and all(isinstance(s["generated"], str) for s in shown)


def test_export_loads_with_auto_peft_from_a_relocated_copy(tiny_llama, tmp_path):
    config = _config(tiny_llama)
    model = _perturbed(build_model(config, LABELS, CPU)).eval()
    save_model(model, config, LABELS, tmp_path / "export", merge=True)
    adapter = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert not adapter["base_model_name_or_path"].startswith(sys.prefix)
    assert json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    relocated = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "export", relocated)
    shutil.rmtree(tmp_path / "export")
    ids = torch.tensor([tokenize(load_tokenizer(str(tiny_llama)), config, _records(1))[0][0]])
    with torch.no_grad():
        expected = model.backbone(input_ids=ids).logits
    script = (
        "import sys, torch; from peft import AutoPeftModelForCausalLM; from transformers import AutoModelForCausalLM\n"
        "ids = torch.tensor([[int(t) for t in sys.argv[2].split(',')]])\n"
        "a = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()(input_ids=ids).logits\n"
        "b = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/merged').eval()(input_ids=ids).logits\n"
        "torch.save((a.detach(), b.detach()), sys.argv[3])\n"
    )
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(relocated), ",".join(map(str, ids[0].tolist())), str(out)],
                   cwd=tmp_path / "elsewhere", check=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    adapted, merged = torch.load(out)
    assert torch.allclose(adapted, expected, atol=1e-4)
    assert torch.allclose(merged, expected, atol=1e-4)
    loaded, labels = load_saved_model(relocated)
    assert labels == LABELS
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-4)


def _opacus_per_record_gradients(upper, batch):
    from opacus import GradSampleModule

    module = GradSampleModule(upper)
    upper.eval()  # no dropout: the same function for the batch and for each record alone
    for trained in (m for m in upper.modules() if any(p.requires_grad for p in m.parameters(recurse=False))):
        trained.train()  # Opacus records only modules in training mode
    module(*batch).mean().backward()
    grads = {name: p.grad_sample.clone() for name, p in upper.named_parameters() if p.requires_grad}
    module._close()
    return grads


def _own_gradient(upper, batch, i):
    upper.zero_grad()
    upper(*(t[i : i + 1] for t in batch)).sum().backward()
    return {name: p.grad.clone() for name, p in upper.named_parameters() if p.requires_grad}


def test_opacus_per_record_gradients_are_each_records_own(tiny_llama, model_config, slice_labels, banking_slice):
    """Regression: an UpperStack that also held the whole model as a submodule gave Opacus two paths
    to every adapter, so it hooked each twice and every per-record gradient came out doubled."""
    from common.data import read_records
    from common.models import encoder

    config = _config(tiny_llama)
    model = _perturbed(build_model(config, LABELS, CPU))
    features = encode(model, config, _records(4))
    cases = [(UpperStack(model, config), features.batch(torch.arange(4), CPU))]
    classifier = _perturbed(encoder.build_model(model_config, slice_labels, CPU))
    records = read_records(banking_slice[0], "text", "category").subset(range(4))
    cached = encoder.encode(classifier, model_config, records)
    labels = torch.tensor(records.label_ids(slice_labels))
    cases.append((encoder.UpperStack(classifier, model_config), (*cached.batch(torch.arange(4), CPU), labels)))
    for upper, batch in cases:
        per_record = _opacus_per_record_gradients(upper, batch)
        for i in range(4):
            own = _own_gradient(upper, batch, i)
            for name, grad in own.items():
                assert torch.allclose(per_record[name][i], grad, atol=1e-5, rtol=1e-3), name


@pytest.fixture(scope="module")
def finished_llm_run(tiny_llama, tmp_path_factory):
    """A simulated causal_lm job: 2 institutions, SecAgg+, DP-SGD, classification as generation."""
    from simulations.cli import main

    folder = tmp_path_factory.mktemp("llm-run")
    for name, count in (("train.csv", 160), ("test.csv", 30)):
        rows = [f"question {i % 30}: where is my card number {i % 30},{LABELS[i % 3]}" for i in range(count)]
        (folder / name).write_text("text,category\n" + "\n".join(rows) + "\n", encoding="utf-8")
    (folder / "job.toml").write_text(
        f'[model]\ntask = "causal_lm"\npath = "{tiny_llama}"\nmax_length = 32\ntrainable_layers = 2\n'
        "[training]\nbatch_size = 40\nadapter_learning_rate = 0.02\n", encoding="utf-8")
    out = folder / "run"
    code = main(["--config", str(folder / "job.toml"), "--train", str(folder / "train.csv"),
                 "--test", str(folder / "test.csv"), "--institutions", "2", "--rounds", "2", "--epsilon", "8",
                 "--alpha", "0.5", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_causal_lm_federation_runs_end_to_end(finished_llm_run, tiny_llama):
    out, metrics = finished_llm_run
    rounds = metrics["rounds"]
    assert all({"accuracy", "loss", "perplexity"} <= set(r) for r in rounds)
    assert rounds[-1]["loss"] < rounds[0]["loss"]
    assert all(inst["steps"] > 0 and inst["epsilon"] <= 8.0 for inst in metrics["institutions"])
    report = (out / "report.md").read_text()
    assert "## Sample generations" in report and "perplexity" in report
    exported = load_file(out / "model" / "adapter_model.safetensors")
    assert exported and all("lora_" in name for name in exported)  # only the adapters travel and are exported
    adapter = json.loads((out / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_llama.resolve())


FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 8}),
    "phi3": ("Phi3Config", {}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 128}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_decoder_family_trains_on_cached_features_as_the_whole_model(family, tmp_path):
    """The family's own forward runs the top layers (its masks, positions, norms): the cached split
    gives Hugging Face's own masked loss for Llama, Qwen2/3, Mistral, Gemma, Phi-3 and GPT-2."""
    import transformers

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    name, extra = FAMILIES[family]
    sizes = {} if family == "gpt2" else {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128}
    config_class = getattr(transformers, name)
    settings = config_class(vocab_size=len(tokenizer), initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            **sizes, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(settings).save_pretrained(tmp_path)
    config = _config(tmp_path)
    model = _perturbed(build_model(config, LABELS, CPU)).eval()
    assert trainable_state(model)
    records = _records(4)
    ids, targets = tokenize(load_tokenizer(str(tmp_path)), config, records)
    with torch.no_grad():
        split = UpperStack(model, config)(*encode(model, config, records).batch(torch.arange(4), CPU))
        for i in range(4):
            labels = torch.tensor([[IGNORE, *targets[i][:-1]]])
            whole = model.backbone(input_ids=torch.tensor([ids[i]]), labels=labels).loss
            assert torch.allclose(split[i], whole, rtol=1e-3, atol=1e-3), (family, i, split[i], whole)


def test_chat_records_as_trl_takes_them_and_one_line_errors(tmp_path, tiny_llama):
    from common.config import DataConfig
    from common.data import DataError, read_job_records

    path = tmp_path / "chats.jsonl"
    chats = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "my card number 3"},
         {"role": "assistant", "content": "card_arrival"}],
        [{"role": "user", "content": "question 4"}, {"role": "assistant", "content": "exchange_rate"}],
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats), encoding="utf-8")
    records = read_job_records(path, DataConfig(messages_column="messages"))
    assert records.labels == ["card_arrival", "exchange_rate"]
    assert records.prompt(0) == (("system", "Be brief."), ("user", "my card number 3"))
    config = _config(tiny_llama)
    tokenizer = load_tokenizer(str(tiny_llama))
    ids, targets = tokenize(tokenizer, config, records)
    expected_prompt = tokenizer("<system> Be brief. <user> my card number 3 <assistant>",
                                add_special_tokens=False)["input_ids"]
    assert ids[0][: len(expected_prompt)] == expected_prompt  # the chat template, system turn kept
    assert [t for t in targets[0] if t != IGNORE] == ids[0][len(expected_prompt):]
    path.write_text(json.dumps({"messages": chats[1][:1]}) + "\n" + json.dumps({"messages": chats[0][:2]}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: row 1: column 'messages' is not a list of 2 or more messages$"):
        read_job_records(path, DataConfig(messages_column="messages"))
    path.write_text(json.dumps({"messages": [*chats[1], {"role": "user", "content": "thanks"}]}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: row 1: the last message's role is 'user', not 'assistant'$"):
        read_job_records(path, DataConfig(messages_column="messages"))


def _checkpointing_run(tiny_llama, checkpointed: bool, mode: str):
    """One DP-SGD run from the same start with the same (seeded) sampling and noise; how often q_proj ran."""
    import client.trainer as trainer

    config = _config(tiny_llama)
    model = _perturbed(build_model(config, LABELS, CPU))
    records = _records(24)
    features = encode(model, config, records)
    plan = plan_noise(records=24, batch_size=12, local_epochs=1.0, rounds=1, grant=8.0, budget=8.0, delta=1e-5,
                      accountant="prv")
    calls = []
    model.layers[-1].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    seeds = iter(range(10))
    original, trainer._secret_generator = trainer._secret_generator, lambda device: torch.Generator(device).manual_seed(next(seeds))
    try:
        train_dp(UpperStack(model, config), features, torch.zeros(24, dtype=torch.long), plan,
                 steps=plan.steps_per_round, max_grad_norm=0.5, learning_rate=0.05, adapter_learning_rate=0.01,
                 accountant=restore_accountant(accountant_state([], "prv"), "prv"), grad_sample_mode=mode,
                 gradient_checkpointing=checkpointed)
    finally:
        trainer._secret_generator = original
    return trainable_state(model), len(calls), plan.steps_per_round


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_gradient_checkpointing_gives_the_same_dp_steps(tiny_llama, mode):
    """Checkpointed layers recompute in the backward pass (q_proj runs twice a step, three times with
    ghost clipping's second backward); Opacus' hooks pause then, so the clipped, noised steps are the same."""
    plain, plain_calls, steps = _checkpointing_run(tiny_llama, False, mode)
    checkpointed, calls, _ = _checkpointing_run(tiny_llama, True, mode)
    assert plain_calls == steps and calls == steps * (2 if mode == "hooks" else 3)
    start = trainable_state(_perturbed(build_model(_config(tiny_llama), LABELS, CPU)))
    for name, value in plain.items():
        assert not torch.equal(value, start[name]), name
        assert torch.allclose(checkpointed[name], value, atol=1e-6, rtol=1e-5), name


def test_per_record_gradients_are_the_same_with_gradient_checkpointing(tiny_llama):
    from opacus import GradSampleModule

    from client.trainer import HooksPaused

    config = _config(tiny_llama)
    model = _perturbed(build_model(config, LABELS, CPU))
    batch = encode(model, config, _records(4)).batch(torch.arange(4), CPU)
    grads = []
    for checkpointed in (False, True):
        upper = UpperStack(model, config)
        module = GradSampleModule(upper)
        upper.train()
        with upper.checkpointed(HooksPaused(module)) if checkpointed else contextlib.nullcontext():
            module(*batch).mean().backward()
        grads.append({name: p.grad_sample.clone() for name, p in upper.named_parameters() if p.requires_grad})
        module._close()
        model.zero_grad(set_to_none=True)
    for name, plain in grads[0].items():
        assert plain.shape[0] == 4 and torch.allclose(grads[1][name], plain, atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_is_refused_for_the_encoder_with_the_flag_named():
    from common.config import load_config

    with pytest.raises(ValueError, match="training.gradient_checkpointing needs model.task = 'causal_lm'"):
        load_config(overrides={"training.gradient_checkpointing": True})


def test_every_assistant_turn_of_a_chat_trains_and_no_other(tmp_path, tiny_llama):
    """Against a mask built by hand: the earlier assistant turn's words and the end token its template
    closes it with train, as does the final response; the system and user words never do."""
    from common.config import DataConfig
    from common.data import read_job_records

    path = tmp_path / "chats.jsonl"
    chat = [{"role": "system", "content": "question"}, {"role": "user", "content": "where is my card"},
            {"role": "assistant", "content": "card_arrival"}, {"role": "user", "content": "exchange"},
            {"role": "assistant", "content": "exchange_rate"}]
    path.write_text(json.dumps({"messages": chat}) + "\n", encoding="utf-8")
    records = read_job_records(path, DataConfig(messages_column="messages"))
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} "
                               "{% if m['role'] == 'assistant' %}[EOS] {% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids, targets = tokenize(tokenizer, _config(tiny_llama), records)
    words = ("< system > question < user > where is my card < assistant > card_arrival [EOS] "
             "< user > exchange < assistant > exchange_rate [EOS]").split()
    assert ids[0] == tokenizer.convert_tokens_to_ids(words)
    trained = {words.index("card_arrival"), words.index("[EOS]"), len(words) - 2, len(words) - 1}
    assert targets[0] == [ids[0][j + 1] if j + 1 in trained else IGNORE for j in range(len(words))]
    without = tokenize(tokenizer, _config(tiny_llama, chat_template=False), records)  # turns joined by lines
    plain = tokenizer("question\nwhere is my card\ncard_arrival\nexchange")["input_ids"]
    assert without[0][0][: len(plain)] == plain
    assert [t for t in without[1][0] if t != IGNORE] == tokenizer.convert_tokens_to_ids(
        ["card_arrival", "exchange_rate", "[EOS]"])


@pytest.mark.parametrize("messages,error", [
    ({"role": "user", "content": "x"}, "column 'messages' is not a list of 2 or more messages"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "no 'assistant' message: nothing to train on"),
    ([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}],
     "message 2 has role 'robot', not one of system, user, assistant"),
])
def test_a_malformed_chat_row_is_one_line_naming_file_and_row(tmp_path, messages, error):
    from common.config import DataConfig
    from common.data import DataError, read_job_records

    path = tmp_path / "chats.jsonl"
    good = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    path.write_text(json.dumps({"messages": good}) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}: row 2: {error}$"):
        read_job_records(path, DataConfig(messages_column="messages"))
