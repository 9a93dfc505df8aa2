"""Spends a site made in rounds whose replies the coordinator never accepted.

A site writes each round's DP-SGD spend to its own ledger before its update leaves. If that
update is lost (a dropped connection) or refused unread (a failed signature), the run ledger
misses a spend the site made, and the site's next cumulative ε no longer matches what the run
ledger can recompute. So every training reply carries the site's spend history as raw
parameters (covered by its signature), and the coordinator backfills the rounds it lacks
before recording the new one: the run ledger stays complete, and `fedllm audit verify` holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import DP_SGD, dp_sgd_entry

__all__ = ["HISTORY_KEYS", "history_metrics", "missing_spends"]

HISTORY_KEYS = ("spent-rounds", "spent-sigma", "spent-q", "spent-steps")


def history_metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int] | list[float]]:
    """A site's DP-SGD spends from its own ledger, as metric lists for its reply."""
    spends = [r for r in records if r.get("mechanism") == DP_SGD]
    return {
        "spent-rounds": [int(r["round"]) for r in spends],
        "spent-sigma": [float(r["noise_multiplier"]) for r in spends],
        "spent-q": [float(r["sample_rate"]) for r in spends],
        "spent-steps": [int(r["steps"]) for r in spends],
    }


def missing_spends(
    run_records: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    *,
    run_id: str,
    site: int,
    before_round: int,
) -> list[dict[str, Any]]:
    """Ledger entries for the site's reported rounds before `before_round` that the run
    ledger lacks, each with the cumulative ε of the history it extends (so each verifies)."""
    if not all(k in metrics for k in HISTORY_KEYS):
        return []
    mine = [
        r
        for r in run_records
        if r.get("mechanism") == DP_SGD
        and str(r.get("site")) == str(site)
        and str(r.get("run_id")) == run_id
    ]
    recorded = {int(r["round"]) for r in mine}
    history = [
        (float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in mine
    ]
    entries = []
    reported = zip(*(list(metrics[k]) for k in HISTORY_KEYS), strict=True)
    for server_round, sigma, q, steps in reported:
        if int(server_round) >= before_round or int(server_round) in recorded:
            continue
        history.append((float(sigma), float(q), int(steps)))
        report = epsilon_report(history, delta=float(metrics["delta"]))
        entry = dp_sgd_entry(
            run_id=run_id,
            server_round=int(server_round),
            site=site,
            noise_multiplier=float(sigma),
            sample_rate=float(q),
            steps=int(steps),
            max_grad_norm=float(metrics["max-grad-norm"]),
            delta=float(metrics["delta"]),
            epsilons={m: float(report[m]) for m in MECHANISMS},
        )
        entry["backfilled"] = (
            f"reported with the site's signed round-{before_round} update; its round-"
            f"{int(server_round)} reply was lost or refused"
        )
        entries.append(entry)
    return entries
