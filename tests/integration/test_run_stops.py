"""Runs that must stop: sites that cannot read their data, and budgets that run out.

Apart from `test_simulation.py` (whose tests share one DP run) so that the two pytest workers
can run them side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FlowerLog
from tests.integration.test_simulation import SITES, _simulate

pytestmark = pytest.mark.slow


def test_missing_dataset_stops_before_writing_a_run_dir(
    tiny_model_dir: Path, tmp_path: Path, flwr_log: FlowerLog
) -> None:
    """Sites that cannot read their data fail round 0: the run stops with one line that names
    the missing file, and no run directory is left behind."""
    # Prepare
    missing = tmp_path / "missing.jsonl"
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "no-data",
        "run.output-dir": str(tmp_path),
        "data.source": str(missing),
    }
    # Execute
    _simulate(overrides)
    # Assert
    assert not (tmp_path / "no-data").exists()
    stop = [m for m in flwr_log.errors() if "could evaluate the initial adapter" in m]
    assert len(stop) == 1 and f"Data file '{missing}' does not exist" in stop[0]


def test_exhausted_budgets_stop_the_run_cleanly_without_overspending(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A budget that allows about one round: sites refuse once they would pass it, the run
    stops cleanly when fewer than run.min-sites remain, and no site's ε exceeds the budget."""
    # Prepare
    cap = 2.5
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "budget",
        "run.output-dir": str(tmp_path),
        "run.rounds": 3,
        "train.local-steps": 4,
        "train.batch-size": 32,
        "privacy.noise-multiplier": 0.7,
        "privacy.epsilon-max": cap,
        "data.max-length": 256,
        "eval.max-examples": 8,
    }
    # Execute
    _simulate(overrides)
    summary = json.loads((tmp_path / "budget" / "summary.json").read_text())
    # Assert
    assert summary["rounds_completed"] == 1
    assert summary["status"] == "stopped" and "refused" in summary["stop_reason"]
    assert summary["refused"] and all(r["round"] == 2 for r in summary["refused"])
    assert all("past its budget of 2.5" in r["reason"] for r in summary["refused"])
    assert len(summary["epsilon"]) == SITES
    assert all(0 < e <= cap for e in summary["epsilon"].values())
    assert all(
        not s["exhausted"] or s["within_budget"] for s in summary["budget"]["sites"].values()
    )
