"""A spend whose reply never reached the run ledger is backfilled, so the ledger verifies."""

from __future__ import annotations

from pathlib import Path

from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.backfill import history_metrics, missing_spends
from fedllm.privacy.ledger import Ledger, dp_sgd_entry
from fedllm.privacy.verify import verify_records

SIGMA, Q, STEPS, DELTA, C = 0.9, 0.05, 3, 1e-4, 1.0


def _entry(server_round: int, rounds_so_far: int) -> dict:
    report = epsilon_report([(SIGMA, Q, STEPS)] * rounds_so_far, delta=DELTA)
    return dp_sgd_entry(
        run_id="r",
        server_round=server_round,
        site=1,
        noise_multiplier=SIGMA,
        sample_rate=Q,
        steps=STEPS,
        max_grad_norm=C,
        delta=DELTA,
        epsilons={m: report[m] for m in MECHANISMS},
    )


def _reply_metrics(site_ledger: Ledger) -> dict:
    last = site_ledger.records()[-1]
    return {
        "site": 1,
        "delta": DELTA,
        "max-grad-norm": C,
        **{f"epsilon-{m}": last["epsilon"][m] for m in MECHANISMS},
        **history_metrics(site_ledger.records()),
    }


def test_a_round_whose_reply_was_refused_is_backfilled_and_the_run_ledger_verifies(
    tmp_path: Path,
) -> None:
    site = Ledger(tmp_path / "site.jsonl")
    run = Ledger(tmp_path / "run.jsonl")
    for r in (1, 2, 3):
        site.append(_entry(r, r))  # the site spends every round
    run.append(_entry(1, 1))  # round 2's reply was refused (a failed signature): not recorded
    metrics = _reply_metrics(site)

    missing = missing_spends(run.records(), metrics, run_id="r", site=1, before_round=3)
    assert [m["round"] for m in missing] == [2]
    assert "round-2 reply was lost or refused" in missing[0]["backfilled"]
    for m in missing:
        run.append(m)
    run.append(_entry(3, 3))  # the site's claim: cumulative over all three rounds
    assert verify_records(run.records()) == []


def test_without_the_backfill_the_sites_cumulative_claim_fails_verification(
    tmp_path: Path,
) -> None:
    run = Ledger(tmp_path / "run.jsonl")
    run.append(_entry(1, 1))
    run.append(_entry(3, 3))
    assert any("claimed" in problem for problem in verify_records(run.records()))


def test_nothing_is_backfilled_when_the_run_ledger_is_complete(tmp_path: Path) -> None:
    site = Ledger(tmp_path / "site.jsonl")
    run = Ledger(tmp_path / "run.jsonl")
    for r in (1, 2):
        site.append(_entry(r, r))
        run.append(_entry(r, r))
    site.append(_entry(3, 3))
    metrics = _reply_metrics(site)
    assert missing_spends(run.records(), metrics, run_id="r", site=1, before_round=3) == []
    assert missing_spends(run.records(), {"site": 1}, run_id="r", site=1, before_round=3) == []
