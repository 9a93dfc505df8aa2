"""A user-level-only run (DP-FedAvg, fixed clipping) writes only what the mechanism released:
no site's update norm, no clipped count, and nowhere which sites trained in which round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedllm.privacy.userdp as userdp
from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger
from fedllm.privacy.userdp import WITHHELD
from fedllm.privacy.verify import verify_records
from fedllm.summary import render_table
from tests.integration.test_simulation import SITES, _simulate
from tests.integration.test_user_level_dp import NormSpy, norm_spellings

pytestmark = pytest.mark.slow

Z, CLIP = 0.8, 0.5
FILES = ("state.json", "summary.json", "ledger.jsonl")


@pytest.fixture(scope="module")
def user_only_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two rounds of user-level DP only (no DP-SGD at the sites), every site sampled."""
    out = tmp_path_factory.mktemp("user-only")
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "tiny-user-only",
        "run.output-dir": str(out),
        "run.rounds": 2,
        "train.local-steps": 2,
        "privacy.mode": "user",
        "privacy.user-noise-multiplier": Z,
        "privacy.user-clip": CLIP,
        "strategy.fraction-train": 1.0,
        "data.max-length": 256,
        "eval.max-examples": 8,
    }
    norms = NormSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(userdp, "clip_update", norms.clip_update)
        _simulate(overrides)
    run_dir = out / "tiny-user-only"
    return {
        "dir": run_dir,
        "texts": {name: (run_dir / name).read_text() for name in FILES},
        "norms": norms.seen,
    }


def _keys(value: Any) -> set[str]:
    """Every key of every mapping in a JSON value, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_the_run_files_name_no_site_norm_count_or_participation(
    user_only_run: dict[str, Any],
) -> None:
    """state.json, summary.json and the run's ledger, read back as text, hold none of the
    sites' update norms and no field that names or counts the sites that trained."""
    # Prepare
    texts, norms = user_only_run["texts"], user_only_run["norms"]
    state, summary = json.loads(texts["state.json"]), json.loads(texts["summary.json"])
    records = [json.loads(line) for line in texts["ledger.jsonl"].splitlines()]
    # Execute
    keys = _keys(state) | _keys(summary) | _keys(records)
    spelled = {f for f in norm_spellings(norms) for t in texts.values() if f in t}
    # Assert
    assert len(norms) == 2 * SITES  # every site's update in both rounds was clipped
    assert spelled == set()
    forbidden = {*WITHHELD, "sampled_sites", "clipped_noisy", "aggregated", "trains"}
    assert keys & forbidden == set()
    assert "bytes" not in state and "refused" not in state
    assert summary["participation"] == [] and summary["bytes_per_round"] == []
    assert all(info["train_loss"] == {} for info in summary["sites"].values())
    assert summary["user_level"]["participation_withheld"] is True


def test_epsilon_and_the_released_parameters_are_recorded_and_verify(
    user_only_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each round's spend (z, q, S, q·N, δ, ε) is in the ledger and the summary, the ledger
    verifies, and `fedllm audit verify`, `audit report` and `runs show` read the run."""
    # Prepare
    from fedllm.cli import main as cli_main

    run_dir = user_only_run["dir"]
    summary = json.loads(user_only_run["texts"]["summary.json"])
    records = Ledger(run_dir / "ledger.jsonl").records()
    # Execute
    problems = verify_records(records)
    verified = cli_main(["audit", "verify", str(run_dir)])
    reported = cli_main(["audit", "report", str(run_dir)])
    capsys.readouterr()
    table = render_table(summary)
    # Assert
    assert problems == [] and verified == 0 and reported == 0
    assert [r["mechanism"] for r in records] == [USER_GAUSSIAN] * 2
    for r in records:
        assert r["noise_multiplier"] == r["update_noise_multiplier"] == Z
        assert (r["sample_rate"], r["clip_norm"], r["expected_sites"]) == (1.0, CLIP, SITES)
    user = summary["user_level"]
    assert user["epsilon"] == pytest.approx(records[-1]["guarantee"])
    assert user["clip_norm"] == [CLIP, CLIP] and user["sample_rate"] == 1.0
    assert [r["epsilon"] for r in user["rounds"]] == [r["guarantee"] for r in records]
    assert "VERIFIED" in (run_dir / "audit-report.md").read_text()
    assert {row for row in table.columns[2].cells} == {"-"}  # "rounds in": not recorded
