"""Budget enforcement: a site refuses a round that would take it past its ε budget."""

from __future__ import annotations

import pytest

from fedllm.errors import BudgetExceededError
from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.budget import check_budget, effective_budget

STEP = (1.0, 0.05, 10)
DELTA = 1e-5


@pytest.mark.parametrize(
    ("epsilon_max", "target", "site_cap", "expected"),
    [
        (0.0, 0.0, None, None),  # nothing caps the spend
        (0.0, 2.0, None, 2.0),  # the calibration target doubles as the cap
        (3.0, 2.0, None, 3.0),  # an explicit epsilon-max wins over the target
        (3.0, 0.0, 1.5, 1.5),  # a site may only lower the run's cap
        (1.0, 0.0, 5.0, 1.0),
    ],
)
def test_effective_budget_combines_run_and_site_caps(
    epsilon_max: float, target: float, site_cap: float | None, expected: float | None
) -> None:
    """The enforced cap is the run's (epsilon-max, else target), lowered by the site's own."""
    # Execute
    budget = effective_budget(
        epsilon_max=epsilon_max, target_epsilon=target, site_epsilon_max=site_cap
    )
    # Assert
    assert budget == expected


def test_a_round_within_budget_returns_the_epsilon_it_would_reach() -> None:
    """Within budget the check passes and reports the guarantee after the round."""
    # Prepare
    after = float(epsilon_report([STEP, STEP], delta=DELTA)["epsilon"])
    # Execute
    reached = check_budget([STEP], STEP, delta=DELTA, budget=after + 1e-9, who="site 2")
    # Assert
    assert reached["epsilon"] == pytest.approx(after)


def test_a_round_past_the_budget_is_refused_naming_site_and_budget() -> None:
    """Just below the ε the next round would reach, the site refuses and says by how much."""
    # Prepare
    after = float(epsilon_report([STEP, STEP], delta=DELTA)["epsilon"])
    # Execute / Assert
    with pytest.raises(BudgetExceededError, match=r"site 2: another round would take epsilon"):
        check_budget([STEP], STEP, delta=DELTA, budget=after - 1e-3, who="site 2")
