import pytest
from opacus.accountants import RDPAccountant

from common.accounting import compact, epsilon, plan_noise, sample_rate, steps_per_round


def test_sample_rate_matches_opacus_dataloader():
    # Opacus' DPDataLoader samples at 1 / len(data_loader) = 1 / ceil(records / batch).
    assert sample_rate(10003, 256) == 1 / 40
    assert sample_rate(100, 256) == 1.0
    assert steps_per_round(2500, 256, 1.0) == 10
    assert steps_per_round(2500, 256, 0.25) == 2  # round(2.5) -> banker's rounding to 2
    assert steps_per_round(10, 256, 0.1) == 1


def test_history_is_compacted_like_opacus():
    assert compact([(1.0, 0.1, 5), (1.0, 0.1, 5), (2.0, 0.1, 1), (1.0, 0.1, 2)]) == [
        (1.0, 0.1, 10),
        (2.0, 0.1, 1),
        (1.0, 0.1, 2),
    ]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_after_three_rounds_is_the_accountant_value_for_all_steps(accountant):
    """Continuity: three rounds of 40 steps are one history of 120 steps, not 3 x epsilon(40)."""
    per_round = [(0.9, 0.05, 40)] * 3
    together = epsilon([(0.9, 0.05, 120)], 1e-5, accountant)
    assert epsilon(per_round, 1e-5, accountant) == pytest.approx(together, rel=1e-9)
    assert together < 3 * epsilon([(0.9, 0.05, 40)], 1e-5, accountant)  # composition is sub-additive here
    assert together > epsilon([(0.9, 0.05, 40)], 1e-5, accountant)


def test_epsilon_matches_a_directly_driven_opacus_accountant():
    acc = RDPAccountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.02)
    for _ in range(20):
        acc.step(noise_multiplier=0.8, sample_rate=0.04)
    assert epsilon([(1.1, 0.02, 30), (0.8, 0.04, 20)], 1e-6, "rdp") == pytest.approx(acc.get_epsilon(1e-6))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("records", "batch", "epochs", "rounds", "target"), [(2500, 256, 1.0, 5, 8.0), (600, 64, 2.0, 3, 1.0)])
def test_planned_noise_ends_just_within_target(accountant, records, batch, epochs, rounds, target):
    plan = plan_noise(
        records=records, batch_size=batch, local_epochs=epochs, rounds=rounds,
        grant=target, budget=target, delta=1e-5, accountant=accountant,
    )
    spent = epsilon(plan.history(rounds), 1e-5, accountant)
    assert spent <= target
    assert spent >= 0.97 * target  # not wastefully noisy
    assert plan.total_steps == rounds * steps_per_round(records, batch, epochs)


def test_plan_after_earlier_spending_fits_the_rest_of_the_budget():
    earlier = [(1.0, 0.1, 50)]
    spent = epsilon(earlier, 1e-5, "rdp")
    plan = plan_noise(
        records=1000, batch_size=100, local_epochs=1, rounds=4,
        grant=6.0 - spent, budget=6.0, delta=1e-5, accountant="rdp", spent=earlier,
    )
    total = epsilon(earlier + plan.history(4), 1e-5, "rdp")
    assert 0.97 * 6.0 <= total <= 6.0
    assert epsilon(plan.history(4), 1e-5, "rdp") <= 6.0 - spent
    with pytest.raises(ValueError, match="already spent"):
        plan_noise(
            records=1000, batch_size=100, local_epochs=1, rounds=4,
            grant=1.0, budget=0.5, delta=1e-5, accountant="rdp", spent=earlier,
        )


def test_the_grant_bounds_the_job_on_its_own_as_well_as_the_total():
    """Regression: a resubmitted job reported 'epsilon this job' 8.07 against a request of 8, since only
    the data set's total was planned for."""
    earlier = [(0.7, 0.2, 30)]
    spent = epsilon(earlier, 1e-5, "prv")
    budget = spent + 8.0  # the budget's remainder is exactly the request
    plan = plan_noise(records=2000, batch_size=400, local_epochs=1, rounds=5, grant=8.0, budget=budget,
                      delta=1e-5, accountant="prv", spent=earlier)
    assert epsilon(plan.history(5), 1e-5, "prv") <= 8.0
    assert epsilon(earlier + plan.history(5), 1e-5, "prv") <= budget


def test_a_history_is_never_read_under_another_mechanism():
    from common.accounting import accountant_state, restore_accountant

    with pytest.raises(ValueError, match="cannot be loaded"):
        restore_accountant(accountant_state([(1.0, 0.1, 10)], "rdp"), "prv")
