"""Budget checks: would one more round take a site past its ε budget? (pure)"""

from __future__ import annotations

from fedllm.errors import BudgetExceededError
from fedllm.privacy.accounting import History, epsilon_report

__all__ = ["check_budget", "effective_budget"]


def effective_budget(
    *, epsilon_max: float, target_epsilon: float, site_epsilon_max: float | None = None
) -> float | None:
    """The cap a site enforces: the run's `epsilon-max` (or else its target), lowered by the
    site's own `epsilon-max` node setting; None when nothing caps the spend."""
    caps = [c for c in (epsilon_max, target_epsilon, site_epsilon_max or 0.0) if c and c > 0]
    if epsilon_max > 0 and target_epsilon > 0:
        caps.remove(target_epsilon)  # an explicit epsilon-max wins over the calibration target
    return min(caps) if caps else None


def check_budget(
    history: History,
    next_step: tuple[float, float, int],
    *,
    delta: float,
    budget: float | None,
    who: str,
) -> dict[str, float | bool]:
    """Return the ε report the site would reach after `next_step`; raise if past `budget`.

    Checked before training, with the same guarantee the ledger records (min of PRV and PLD),
    so a site never releases an update that takes it past its budget. The report is the one
    the site records after training (the round's steps are fixed), so it is computed once.

    Raises
    ------
    BudgetExceededError
        Naming `who` (a site, or the user-level mechanism), the ε it would reach and the budget.
    """
    report = epsilon_report([*history, next_step], delta=delta)
    after = float(report["epsilon"])
    if budget is not None and after > budget:
        spent = float(epsilon_report(history, delta=delta)["epsilon"]) if history else 0.0
        raise BudgetExceededError(
            f"{who}: another round would take epsilon from {spent:.4f} to {after:.4f}, "
            f"past its budget of {budget:g}; it refuses to train."
        )
    return report
