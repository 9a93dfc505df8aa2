"""`fedllm audit verify` cross-checks the run's ledger, the sites' ledgers and the summary:
a ledger that is consistent on its own but cut short, or not the one the sites wrote, fails
(issue 16, item 6 in part)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main as cli
from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import Ledger, dp_sgd_entry
from fedllm.rundir import LEDGER_FILE, RunDir

SITES, ROUNDS, DELTA = 2, 2, 1e-5


def _make_run(root: Path) -> Path:
    """A record-level run of 2 sites x 2 rounds whose every file agrees."""
    run = root / "run"
    history: dict[int, list[tuple[float, float, int]]] = {s: [] for s in range(SITES)}
    epsilon = {}
    for r in range(1, ROUNDS + 1):
        for s in range(SITES):
            history[s].append((1.0, 0.25, 2))
            report = epsilon_report(history[s], delta=DELTA)
            entry = dp_sgd_entry(
                run_id="run",
                server_round=r,
                site=s,
                noise_multiplier=1.0,
                sample_rate=0.25,
                steps=2,
                max_grad_norm=1.0,
                delta=DELTA,
                epsilons={m: float(report[m]) for m in MECHANISMS},
            )
            Ledger(run / LEDGER_FILE).append(entry)
            Ledger(RunDir.site_ledger_path(run, s)).append(entry)
            epsilon[str(s)] = float(report["epsilon"])
    summary = {
        "privacy": {"mode": "record"},
        "epsilon": epsilon,
        "participation": [{"round": r, "aggregated": list(range(SITES))} for r in (1, 2)],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def _verify(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli(["audit", "verify", str(run)])
    return code, capsys.readouterr().out


def test_a_run_whose_files_agree_passes_the_cross_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _verify(_make_run(tmp_path), capsys)
    assert code == 0 and "OK   cross-check: the run's ledger, 2 site ledgers" in out


def test_a_run_ledger_cut_short_fails_naming_the_missing_spend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dropping the last record leaves a valid chain: only the site's own ledger and the
    summary show that a spend is missing."""
    run = _make_run(tmp_path)
    ledger = run / LEDGER_FILE
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    code, out = _verify(run, capsys)
    assert code == 1
    assert f"OK   {ledger}" in out  # the cut ledger still verifies on its own
    assert "site 1's ledger has its round-2 spend; the run's lacks it" in out
    assert "summary.json aggregates site 1 in round 2, but the run's ledger has no spend" in out


def test_a_site_ledger_that_is_not_the_one_the_run_recorded_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Site 0's ledger rebuilt, consistently, at a larger σ than the run recorded."""
    run = _make_run(tmp_path)
    site = RunDir.site_ledger_path(run, 0)
    records = Ledger(site).records()
    site.unlink()
    history = []
    for r in records:
        history.append((2.0, r["sample_rate"], r["steps"]))
        report = epsilon_report(history, delta=DELTA)
        Ledger(site).append(
            dp_sgd_entry(
                run_id="run",
                server_round=r["round"],
                site=0,
                noise_multiplier=2.0,
                sample_rate=r["sample_rate"],
                steps=r["steps"],
                max_grad_norm=1.0,
                delta=DELTA,
                epsilons={m: float(report[m]) for m in MECHANISMS},
            )
        )
    code, out = _verify(run, capsys)
    assert code == 1 and f"OK   {site}" in out
    assert "site 0's round-1 spend differs from the run's record of it" in out


def test_a_summary_reporting_another_epsilon_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _make_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["epsilon"]["0"] = summary["epsilon"]["0"] / 2
    (run / "summary.json").write_text(json.dumps(summary))
    code, out = _verify(run, capsys)
    assert code == 1 and "summary.json reports epsilon" in out and "for site 0" in out
