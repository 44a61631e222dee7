import torch

from common.data import read_records
from common.model import (
    UpperStack,
    build_model,
    count_parameters,
    encode,
    load_saved_model,
    load_tokenizer,
    load_trainable_state,
    model_path,
    save_model,
    trainable_state,
)

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
    texts = read_records(banking_slice[0], "text", "category").texts[:24]
    features = encode(model, model_config, texts)
    tokens = load_tokenizer(model_path(model_config))(
        texts, truncation=True, max_length=model_config.max_length, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        whole = model(tokens["input_ids"], tokens["attention_mask"])
        split = UpperStack(model, model_config).eval()(*features.batch(torch.arange(len(texts)), CPU))
    assert torch.allclose(whole, split, atol=2e-2), (whole - split).abs().max()
    assert whole.abs().max() > 0.1  # the comparison is not between two zero tensors


def test_feature_cache_is_reused_and_keyed_by_text(model_config, slice_labels, tmp_path):
    model = build_model(model_config, slice_labels, CPU)
    first = encode(model, model_config, ["a card question", "a transfer question"], tmp_path)
    files = list((tmp_path / "features").iterdir())
    assert len(files) == 1
    again = encode(model, model_config, ["a card question", "a transfer question"], tmp_path)
    assert torch.equal(first.values, again.values)
    encode(model, model_config, ["something else"], tmp_path)
    assert len(list((tmp_path / "features").iterdir())) == 2


def test_exported_model_loads_with_peft_and_predicts_the_same(model_config, slice_labels, tmp_path):
    model = _perturbed(build_model(model_config, slice_labels, CPU)).eval()
    save_model(model, slice_labels, tmp_path / "model")
    loaded, labels = load_saved_model(tmp_path / "model")
    assert labels == slice_labels
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    batch = tokenizer(["my card has not arrived", "how do I top up"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**batch), loaded(**batch), atol=1e-5)
    assert not any("weight" in p.name and "lora" not in p.name for p in (tmp_path / "model").glob("*.bin"))
