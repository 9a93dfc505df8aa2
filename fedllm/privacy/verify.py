"""Check a privacy ledger without trusting whoever wrote it: the hash chain, and every ε.

Each spend record's cumulative ε is recomputed from the raw parameters (σ, q, steps, δ) of
the records before it in the same history, by every accountant, and compared with what was
claimed. A history is one (run, mechanism, site): a site's record-level DP-SGD, or the run's
user-level DP-FedAvg; the two are never composed together. `cross_check` then compares the
run's ledger, the sites' own ledgers and `summary.json` with each other.
"""

from __future__ import annotations

import math
from typing import Any

from fedllm.privacy.accounting import MECHANISMS, History, epsilon_report
from fedllm.privacy.config import RECORD_LEVEL_MODES
from fedllm.privacy.ledger import DP_SGD, MECHANISM_NAMES, verify_chain

__all__ = ["cross_check", "plausible", "verify_records"]

_REL_TOL = 1e-6


# What `float()` and `int()` raise on a field of the wrong kind: a string, a list, an int
# past float's range, an infinite float where a step count belongs.
_MALFORMED = (KeyError, TypeError, ValueError, OverflowError)


def _close(claimed: Any, actual: float) -> bool:
    try:
        return math.isclose(float(claimed), actual, rel_tol=_REL_TOL, abs_tol=1e-9)
    except _MALFORMED:
        return False


def plausible(record: dict[str, Any]) -> bool:
    """Whether a spend record's raw parameters are ones an accountant can take at all."""
    try:
        sigma, q = float(record["noise_multiplier"]), float(record["sample_rate"])
        steps, delta = int(record["steps"]), float(record["delta"])
    except _MALFORMED:
        return False
    return sigma > 0 and 0 < q <= 1 and steps >= 1 and 0 < delta < 1


def verify_records(records: list[dict[str, Any]]) -> list[str]:
    """Every problem found, each naming its record; an empty list means the ledger holds."""
    problems = verify_chain(records)
    histories: dict[tuple[str, str, str], History] = {}
    deltas: dict[tuple[str, str, str], float] = {}
    for index, record in enumerate(records, start=1):
        label = (
            f"record {index} (seq {record.get('seq', '?')}, site {record.get('site')}, "
            f"round {record.get('round')})"
        )
        if "mechanism" not in record:  # every record a ledger holds is a spend
            problems.append(
                f"{label}: no mechanism field; a spend record must name its mechanism "
                f"({' or '.join(MECHANISM_NAMES)}), or its epsilon cannot be checked."
            )
            continue
        if record["mechanism"] not in MECHANISM_NAMES:
            problems.append(
                f"{label}: unknown mechanism {record['mechanism']!r}; no epsilon can be checked."
            )
            continue
        try:
            key = (str(record["run_id"]), str(record["mechanism"]), str(record["site"]))
            step = (
                float(record["noise_multiplier"]),
                float(record["sample_rate"]),
                int(record["steps"]),
            )
            delta = float(record["delta"])
            claimed = record["epsilon"]
            if not isinstance(claimed, dict):
                raise TypeError(f"epsilon is a {type(claimed).__name__}, not one per accountant")
        except _MALFORMED as e:
            problems.append(f"{label}: missing or malformed field ({e}).")
            continue
        if not plausible(record):
            sigma, q, steps = step
            problems.append(
                f"{label}: impossible parameters (sigma={sigma}, q={q}, steps={steps}, "
                f"delta={delta}); no epsilon can be recomputed from them."
            )
            continue
        if deltas.setdefault(key, delta) != delta:
            problems.append(f"{label}: delta changed from {deltas[key]} to {delta} mid-run.")
        histories.setdefault(key, []).append(step)
        report = epsilon_report(histories[key], delta=delta)
        for mechanism in MECHANISMS:
            if not _close(claimed.get(mechanism), float(report[mechanism])):
                problems.append(
                    f"{label}: claimed {mechanism} epsilon {claimed.get(mechanism)} but the raw "
                    f"parameters give {float(report[mechanism]):.6f}."
                )
        if not _close(record.get("guarantee"), float(report["epsilon"])):
            problems.append(
                f"{label}: claimed guarantee {record.get('guarantee')} but "
                f"min(PRV, PLD) is {float(report['epsilon']):.6f}."
            )
    return problems


def _spends(records: list[dict[str, Any]], site: int) -> dict[int, dict[str, Any]]:
    """A site's record-level DP-SGD spends in `records`, by round."""
    return {
        int(r["round"]): r
        for r in records
        if r.get("mechanism") == DP_SGD and str(r.get("site")) == str(site)
    }


_SAME = ("noise_multiplier", "sample_rate", "steps", "delta")


def cross_check(
    run_records: list[dict[str, Any]],
    site_records: dict[int, list[dict[str, Any]]],
    summary: dict[str, Any] | None,
) -> list[str]:
    """Where the run's ledger, the sites' own ledgers and `summary.json` disagree.

    Each ledger can be internally consistent and still be the wrong one: a ledger rewritten
    with its chain re-hashed, or cut short. So every spend a site recorded must be in the
    run's ledger with the same parameters (and the reverse), every site the summary names as
    aggregated in a round must have that round's spend, and the ε the summary reports for a
    site must be its last spend's guarantee. What this cannot catch: every file rewritten
    consistently by whoever holds them all (only signatures of the sites would).
    """
    problems = []
    spends_of: dict[int, dict[int, dict[str, Any]]] = {}  # the run ledger's, by site

    def run_spends(site: int) -> dict[int, dict[str, Any]]:
        if site not in spends_of:
            spends_of[site] = _spends(run_records, site)
        return spends_of[site]

    for site, records in sorted(site_records.items()):
        own, run = _spends(records, site), run_spends(site)
        name = f"site {site}"
        for r in sorted(set(own) | set(run)):
            if r not in run:
                problems.append(f"{name}'s ledger has its round-{r} spend; the run's lacks it")
            elif r not in own:
                problems.append(f"the run's ledger has {name}'s round-{r} spend; its own lacks it")
            elif any(not _close(own[r][k], float(run[r][k])) for k in _SAME):
                problems.append(f"{name}'s round-{r} spend differs from the run's record of it")
    if summary:
        record_level = (summary.get("privacy") or {}).get("mode") in RECORD_LEVEL_MODES
        for p in summary.get("participation") or []:
            for site in p.get("aggregated", []) if record_level else []:
                if int(p["round"]) not in run_spends(int(site)):
                    problems.append(
                        f"summary.json aggregates site {site} in round {p['round']}, but the "
                        "run's ledger has no spend of it there (a record dropped?)"
                    )
        for site, claimed in (summary.get("epsilon") or {}).items():
            spends = run_spends(int(site))
            if claimed is not None and spends:
                last = spends[max(spends)]
                if not _close(claimed, float(last["guarantee"])):
                    problems.append(
                        f"summary.json reports epsilon {claimed} for site {site}; its last spend "
                        f"in the run's ledger (round {max(spends)}) states {last['guarantee']}"
                    )
    return problems
