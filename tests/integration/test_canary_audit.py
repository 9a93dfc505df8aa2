"""End-to-end canary audits: an honest DP run passes, a run that lies about DP is caught by
its white-box gradient canaries (the black-box word canaries are only scored: see below)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import Ledger, dp_sgd_entry
from tests.simulate import simulate

pytestmark = pytest.mark.slow

AUDIT = {
    "run.rounds": 1,
    "train.local-steps": 30,
    "train.batch-size": 128,
    "train.physical-batch-size": 64,
    "train.optimizer": "sgd",
    "train.learning-rate": 0.5,
    "lora.rank": 16,
    "lora.target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "audit.gradient-canaries": 1000,
    "audit.canaries": 1000,
    "audit.canary-length": 2,
    "audit.secrets": 1,
    "audit.secret-alternatives": 100,
    "data.max-length": 256,
    "eval.max-examples": 4,
}


def _run(tiny_model_dir: Path, out: Path, name: str, **extra: Any) -> Path:
    # Two sites: only `audit.canary-site` (site 0) inserts canaries; a third site would train
    # as long as it and add nothing to the audit.
    simulate(
        {
            "model.name": str(tiny_model_dir),
            "run.output-dir": str(out),
            "run.name": name,
            **AUDIT,
            **extra,
        },
        sites=2,
    )
    return out / name


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("audit-runs")
    return {
        "dp": _run(tiny_model_dir, out, "audit-dp", **{"privacy.noise-multiplier": 1.0}),
        # No clipping without DP: the canaries take the scale of real per-example gradients.
        "none": _run(
            tiny_model_dir,
            out,
            "audit-none",
            **{"privacy.mode": "none", "privacy.max-grad-norm": 10.0},
        ),
    }


def test_honest_dp_run_has_a_lower_bound_at_or_below_its_proven_epsilon(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm audit canaries` on a DP-SGD auditing run: both canary kinds and the secret
    are scored, the bounds sit at or below the proven ε, and the report shows them.

    Only the white-box gradient canaries discriminate here (next test). The black-box half
    (random-word canaries, secret exposure) is scored but proves nothing on this model: in
    30 steps it memorises no random word, with or without DP (both bounds are 0; see
    docs/benchmarks.md), so this suite does not test black-box auditing's power."""
    # Prepare
    from fedllm.cli import main as cli

    # Execute
    code = cli(["audit", "canaries", str(runs["dp"])])
    result = json.loads((runs["dp"] / "audit" / "empirical.json").read_text())
    report_code = cli(["audit", "report", str(runs["dp"])])
    markdown = (runs["dp"] / "audit-report.md").read_text()
    capsys.readouterr()
    # Assert
    assert code == 0 and report_code == 0 and result["status"] == "consistent"
    assert result["proven_from"] == "record-level DP-SGD"
    for kind in ("gradient_canaries", "membership"):
        assert result[kind]["canaries"] == 1000
        assert 0 <= result[kind]["epsilon_lower_bound"] <= result["proven_epsilon"]
    assert result["secrets"][0]["trained"]["alternatives"] == 100
    assert "white-box gradient canaries" in markdown and "Exposure of inserted secrets" in markdown


def test_non_dp_run_leaks_measurably_more_than_the_dp_run(runs: dict[str, Path]) -> None:
    """Same data, same canaries: without DP the white-box lower bound is clearly positive and
    higher than with DP, and no ε is proven."""
    # Prepare
    from fedllm.cli import main as cli

    # Execute
    cli(["audit", "canaries", str(runs["none"])])
    nodp = json.loads((runs["none"] / "audit" / "empirical.json").read_text())
    dp = json.loads((runs["dp"] / "audit" / "empirical.json").read_text())
    # Assert
    assert nodp["proven_epsilon"] is None
    no, yes = (r["gradient_canaries"]["epsilon_lower_bound"] for r in (nodp, dp))
    assert no > 0.5 and no > yes + 0.5


def test_a_ledger_claiming_dp_that_was_not_applied_is_caught_by_the_canaries(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator writes a flawless ledger claiming σ = 50 for the non-DP run, and a summary
    that agrees with it. Both verify (they are consistent), but the canaries prove ε above
    the claim: `fedllm
    audit canaries` exits 1 naming the bug, and the report marks the audit FAILED."""
    # Prepare
    from fedllm.cli import main as cli

    forged = tmp_path / "forged"
    shutil.copytree(runs["none"], forged)
    summary = json.loads((forged / "summary.json").read_text())
    n = summary["sites"]["0"]["num_examples"]
    q, steps, delta = 128 / n, AUDIT["train.local-steps"], 1e-5
    report = epsilon_report([(50.0, q, steps)], delta=delta)
    forged_record = Ledger(forged / "ledger.jsonl").append(
        dp_sgd_entry(
            run_id="audit-none",
            server_round=1,
            site=0,
            noise_multiplier=50.0,
            sample_rate=q,
            steps=steps,
            max_grad_norm=1.0,
            delta=delta,
            epsilons={m: float(report[m]) for m in ("rdp", "prv", "pld")},
        )
    )
    # ...and a summary.json to match it, so the files also agree with each other
    summary["epsilon"]["0"] = forged_record["guarantee"]
    (forged / "summary.json").write_text(json.dumps(summary))
    # Execute
    verify_code = cli(["audit", "verify", str(forged)])
    audit_code = cli(["audit", "canaries", str(forged)])
    report_code = cli(["audit", "report", str(forged)])
    err = capsys.readouterr().err
    markdown = (forged / "audit-report.md").read_text()
    # Assert
    assert verify_code == 0  # the forgery is internally consistent
    assert audit_code == 1 and "BUG" in err and "exceeds the proven epsilon" in err
    assert report_code == 1 and "**Empirical audit**: FAILED" in markdown
