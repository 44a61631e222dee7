import torch

from client.trainer import train_dp
from common.accounting import accountant_state, epsilon, plan_noise, restore_accountant
from common.data import read_records
from common.models.encoder import UpperStack, build_model, encode
from common.models.transport import trainable_state


def _setup(model_config, slice_labels, banking_slice):
    model = build_model(model_config, slice_labels, torch.device("cpu"))
    records = read_records(banking_slice[0], "text", "category")
    features = encode(model, model_config, records)
    labels = torch.tensor(records.label_ids(slice_labels))
    plan = plan_noise(
        records=len(records), batch_size=64, local_epochs=1.0, rounds=3,
        grant=8.0, budget=8.0, delta=1e-5, accountant="prv",
    )
    return model, features, labels, plan


def _train(model, model_config, features, labels, plan, history):
    return train_dp(
        UpperStack(model, model_config), features, labels, plan, steps=plan.steps_per_round,
        max_grad_norm=1.0, learning_rate=0.05, adapter_learning_rate=0.01,
        accountant=restore_accountant(accountant_state(history, "prv"), "prv"),
    )


def test_lora_weights_change_after_dp_steps(model_config, slice_labels, banking_slice):
    """Opacus issue 820: peft adapters can silently receive no per-sample gradients."""
    model, features, labels, plan = _setup(model_config, slice_labels, banking_slice)
    before = trainable_state(model)
    _train(model, model_config, features, labels, plan, [])
    after = trainable_state(model)
    lora_b = [name for name in before if "lora_B" in name]
    lora_a = [name for name in before if "lora_A" in name]
    assert lora_a and lora_b
    for name in before:
        assert not torch.equal(before[name], after[name]), f"{name} did not change"
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.grad is None for p in frozen.values())


def test_accountant_continues_across_rounds_and_loss_falls(model_config, slice_labels, banking_slice):
    model, features, labels, plan = _setup(model_config, slice_labels, banking_slice)
    history = []
    losses = []
    for _ in range(3):
        result = _train(model, model_config, features, labels, plan, history)
        history = result.history
        losses.append(result.mean_loss)
    assert history == [(plan.noise_multiplier, plan.sample_rate, 3 * plan.steps_per_round)]
    assert epsilon(history, 1e-5, "prv") <= 8.0
    one_round = [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    assert epsilon(history, 1e-5, "prv") > epsilon(one_round, 1e-5, "prv")
    assert losses[-1] < losses[0]


def test_adam_goes_on_from_a_given_state(model_config, slice_labels, banking_slice):
    model, features, labels, plan = _setup(model_config, slice_labels, banking_slice)
    first = _train(model, model_config, features, labels, plan, [])
    again = train_dp(UpperStack(model, model_config), features, labels, plan, steps=plan.steps_per_round,
                     max_grad_norm=1.0, learning_rate=0.05, adapter_learning_rate=0.01, adam_state=first.adam_state,
                     accountant=restore_accountant(accountant_state(first.history, "prv"), "prv"))
    steps = plan.steps_per_round
    assert {int(state["step"]) for state in again.adam_state.values()} == {2 * steps}
    # Carried, the second moment only decays and grows: v_new >= beta2^steps * v_old everywhere. A fresh
    # Adam's v after the same steps has no such floor.
    for index, state in again.adam_state.items():
        floor = 0.999**steps * first.adam_state[index]["exp_avg_sq"]
        assert bool((state["exp_avg_sq"] >= floor * (1 - 1e-6)).all())


def test_saved_adam_state_is_used_only_for_the_same_trainable_weights(tmp_path, capfd):
    from client import optimizer_state

    path = optimizer_state.state_file(tmp_path, "st-mary", "job-00000000000000aa")
    weights = [("head.weight", (3, 4)), ("lora_A", (4, 2))]
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3, 4), "exp_avg_sq": torch.ones(3, 4)}}
    assert optimizer_state.load(path, weights) is None  # the job's first round
    optimizer_state.save(path, weights, state)
    assert torch.equal(optimizer_state.load(path, weights)[0]["exp_avg"], torch.ones(3, 4))
    assert optimizer_state.load(path, [("head.weight", (5, 4)), ("lora_A", (4, 2))]) is None  # another label count
    path.write_bytes(path.read_bytes()[:40])  # a torn file
    assert optimizer_state.load(path, weights) is None
    torch.save({"state": state}, path)  # a readable file of another shape
    assert optimizer_state.load(path, weights) is None
    assert capfd.readouterr().err.count("starts a fresh Adam") == 3
