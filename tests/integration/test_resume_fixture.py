"""A run directory written by an older fedllm (tests/fixtures/README.md) resumes with today's.

The fixture is two record-level DP rounds on three chatterbot sites with the tiny test model,
made at commit ea5a1fe. It is copied to a temporary folder, the tiny model is rebuilt there
(same seed, same weights), and the one absolute path the old run stored (its folder,
`/tmp/fedllm-resume-fixture`, holding the model and `outputs/`) is rewritten to the new
folder in `config.json` and `state.json`. Nothing else is touched. Then the same run is asked
for a third round, the way a user resumes: the same command with a larger `run.rounds`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fedllm.cli import main as cli
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir
from tests.simulate import simulate
from tests.tiny import make_tiny_model_dir

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "record-dp"
OLD_ROOT = "/tmp/fedllm-resume-fixture"  # where the fixture was made
SITES = 3
ROUNDS_BEFORE = 2
# The overrides the fixture was made with (tests/fixtures/README.md), bar run.rounds.
OVERRIDES: dict[str, Any] = {
    "run.name": "record-dp",
    "run.output-dir": "outputs",
    "train.local-steps": 2,
    "train.batch-size": 16,
    "train.physical-batch-size": 8,
    "privacy.noise-multiplier": 0.8,
    "data.max-length": 256,
    "eval.max-examples": 8,
    # Made before data.split existed: its sites split by the seeded permutation, and it
    # resumes only under that split (the default is now each record's own hash).
    "data.split": "permutation",
}


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every dict key in `value`, as a dotted path; list items share their list's path."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}{key}"
            paths |= {path} | _key_paths(item, f"{path}.")
    elif isinstance(value, list):
        for item in value:
            paths |= _key_paths(item, f"{prefix}[].")
    return paths


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The old run, moved to a temporary folder and resumed for one more round."""
    root = tmp_path_factory.mktemp("resume")
    tiny = make_tiny_model_dir(root / "tiny-model")
    run_dir = root / "outputs" / "record-dp"
    shutil.copytree(FIXTURE, run_dir)
    for name in ("config.json", "state.json"):
        path = run_dir / name
        path.write_text(path.read_text(encoding="utf-8").replace(OLD_ROOT, str(root)))
    before = {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "state": json.loads((run_dir / "state.json").read_text()),
        "round-1": (run_dir / "checkpoints" / "round-1" / "adapter_model.safetensors").read_bytes(),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # run.output-dir is relative, as by default
        simulate(
            {**OVERRIDES, "model.name": str(tiny), "run.rounds": ROUNDS_BEFORE + 1}, sites=SITES
        )
    return {
        "dir": run_dir,
        "before": before,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "state": json.loads((run_dir / "state.json").read_text()),
    }


def test_the_fixture_is_the_old_run_as_it_was_made() -> None:
    """The fixture holds a finished two-round run whose stored paths name its old folder."""
    # Prepare
    summary = json.loads((FIXTURE / "summary.json").read_text())
    # Execute
    config = (FIXTURE / "config.json").read_text()
    # Assert
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS_BEFORE
    assert f"{OLD_ROOT}/tiny-model" in config
    assert not (FIXTURE / "checkpoints" / f"round-{ROUNDS_BEFORE + 1}").exists()


def test_an_old_run_directory_resumes_for_one_more_round(resumed: dict[str, Any]) -> None:
    """It continues from round 2 (not from scratch): round 3 runs, rounds 1 and 2 stay."""
    # Prepare
    old, new = resumed["before"]["summary"], resumed["summary"]
    ckpts = resumed["dir"] / "checkpoints"
    # Execute
    round_1 = (ckpts / "round-1" / "adapter_model.safetensors").read_bytes()
    # Assert
    assert resumed["before"]["state"]["rounds_completed"] == ROUNDS_BEFORE
    assert resumed["state"]["rounds_completed"] == ROUNDS_BEFORE + 1
    assert new["status"] == "completed" and new["rounds_completed"] == ROUNDS_BEFORE + 1
    assert [b["round"] for b in new["bytes_per_round"]] == [0, 1, 2, 3]
    assert new["eval_loss"][: ROUNDS_BEFORE + 1] == old["eval_loss"]  # not evaluated again
    assert len(new["eval_loss"]) == ROUNDS_BEFORE + 2
    assert round_1 == resumed["before"]["round-1"]  # an old checkpoint is never rewritten
    assert (ckpts / f"round-{ROUNDS_BEFORE + 1}" / "adapter_model.safetensors").is_file()


def test_every_ledger_holds_each_round_once_and_the_run_ledger_verifies(
    resumed: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each site's own ledger has rounds 1, 2, 3 once; `fedllm audit verify` passes them all."""
    # Prepare
    run_dir = resumed["dir"]
    rounds = list(range(1, ROUNDS_BEFORE + 2))
    # Execute
    code = cli(["audit", "verify", str(run_dir)])  # in-process: opacus is already imported
    shown = capsys.readouterr().out
    run_records = Ledger(run_dir / "ledger.jsonl").records()
    # Assert
    assert code == 0, shown
    assert shown.count("OK   /") == 1 + SITES  # every ledger...
    assert "OK   cross-check" in shown  # ...and they agree with each other and the summary
    for site in range(SITES):
        records = Ledger(RunDir.site_ledger_path(run_dir, site)).records()
        assert [r["round"] for r in records] == rounds, site
        assert sorted(r["round"] for r in run_records if r["site"] == site) == rounds, site


def test_epsilon_keeps_growing_from_where_the_old_run_left_it(resumed: dict[str, Any]) -> None:
    """Round 3's ε is above round 2's on every site, and rounds 1-2 keep their old values."""
    # Prepare
    old, new = resumed["before"]["summary"], resumed["summary"]
    # Execute
    sites = new["sites"]
    # Assert
    assert set(sites) == {str(k) for k in range(SITES)}
    for site, info in sites.items():
        before = old["sites"][site]["epsilon"]
        assert {k: info["epsilon"][k] for k in before} == pytest.approx(before, rel=1e-9)
        assert info["epsilon"]["3"] > before["2"] > 0, site
        assert new["epsilon"][site] > old["epsilon"][site], site


def test_the_new_summary_keeps_every_key_of_the_old_one(resumed: dict[str, Any]) -> None:
    """summary.json after the resume has every key (at every depth) the old one had."""
    # Prepare
    old = _key_paths(resumed["before"]["summary"])
    # Execute
    new = _key_paths(resumed["summary"])
    # Assert
    assert sorted(old - new) == []
