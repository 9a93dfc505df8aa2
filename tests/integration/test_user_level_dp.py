"""End-to-end user-level DP-FedAvg (adaptive clipping) beside record-level DP-SGD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import fedllm.privacy.userdp as userdp
from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger
from fedllm.privacy.userdp import WITHHELD
from tests.integration.test_simulation import SITES, _simulate

pytestmark = pytest.mark.slow

# COUNT_STD: with every update clipped in round 1 the noisy unclipped fraction is
# N(0, COUNT_STD) / 3, and the clip norm shrinks only if that exceeds the target quantile
# 0.5: at 1.0 that happened in 6.7% of runs (a flaky test), at 0.4 in 0.009%. It must stay
# above Z / 2 for the noise split to exist.
Z, COUNT_STD, DELTA = 0.6, 0.4, 1e-5


@pytest.fixture(scope="module")
def user_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Record-level DP-SGD at the sites and user-level DP-FedAvg at the server, with a
    user-level budget that allows two of the three planned rounds."""
    out = tmp_path_factory.mktemp("user-runs")
    two_rounds = float(epsilon_report([(Z, 1.0, 1)] * 2, delta=DELTA)["epsilon"])
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "tiny-user",
        "run.output-dir": str(out),
        "run.rounds": 3,
        "train.local-steps": 2,
        "privacy.mode": "record+user",
        "privacy.noise-multiplier": 0.7,
        "privacy.user-noise-multiplier": Z,
        "privacy.user-clip": 0.05,
        "privacy.user-clipping": "adaptive",
        "privacy.user-count-stddev": COUNT_STD,
        "privacy.user-delta": DELTA,
        "privacy.user-epsilon-max": two_rounds + 1e-6,
        "data.max-length": 256,
        "eval.max-examples": 8,
    }
    norms = NormSpy()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(userdp, "clip_update", norms.clip_update)
        _simulate(overrides)
    run_dir = out / "tiny-user"
    return {
        "dir": run_dir,
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "norms": norms.seen,
    }


class NormSpy:
    """`clip_update` as the coordinator's user-level stage calls it (the ServerApp runs in
    this process), remembering every site's update norm: what the run must not write."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self._real = userdp.clip_update

    def clip_update(self, update: Any, clip_norm: float) -> Any:
        clipped, norm = self._real(update, clip_norm)
        self.seen.append(norm)
        return clipped, norm


def norm_spellings(norms: list[float]) -> set[str]:
    """Every way a norm could be written into a file: as JSON writes a float, rounded to 6
    places (as the summary once did) and to 6 significant figures."""
    return {f for n in norms for f in (json.dumps(n), json.dumps(round(n, 6)), f"{n:.6g}")}


def test_user_level_epsilon_is_accounted_per_round_and_reported_apart(
    user_run: dict[str, Any],
) -> None:
    """The run ledger holds one user-level Gaussian step per round, its ε is the sampled
    Gaussian composed over rounds, and the summary keeps it apart from per-site ε."""
    # Prepare
    summary, run_dir = user_run["summary"], user_run["dir"]
    records = Ledger(run_dir / "ledger.jsonl").records()
    # Execute
    user = [r for r in records if r["mechanism"] == USER_GAUSSIAN]
    expected = [epsilon_report([(Z, 1.0, 1)] * k, delta=DELTA)["epsilon"] for k in (1, 2)]
    # Assert
    assert [r["round"] for r in user] == [1, 2]
    assert [r["guarantee"] for r in user] == pytest.approx(expected, rel=1e-9)
    assert all(r["level"] == "user" and r["site"] == "all" for r in user)
    assert all(r["expected_sites"] == SITES and r["sample_rate"] == 1.0 for r in user)
    assert user[0]["update_noise_multiplier"] > Z  # part of the budget went to the count
    assert summary["user_level"]["epsilon"] == pytest.approx(expected[1], rel=1e-9)
    assert summary["user_level"]["delta"] == DELTA
    assert set(summary["epsilon"]) == {str(s) for s in range(SITES)}  # record-level, per site
    assert all(e != summary["user_level"]["epsilon"] for e in summary["epsilon"].values())


def test_adaptive_clipping_moves_the_clip_norm_towards_the_quantile(
    user_run: dict[str, Any],
) -> None:
    """Every update is far above the 0.05 starting norm, so the norm grows round on round;
    the summary holds the noised count of clipped updates it moved on (all 3, give or take
    noise of std 0.4), not the exact one."""
    # Prepare
    rounds = user_run["summary"]["user_level"]["rounds"]
    # Execute
    norms = [r["clip_norm"] for r in rounds]
    # Assert
    assert all(n > 0.05 for n in user_run["norms"][:SITES])  # round 1's updates
    assert "clipped" not in rounds[0]
    assert abs(rounds[0]["clipped_noisy"] - SITES) < 5 * COUNT_STD
    assert norms[1] > norms[0]


def test_no_site_norm_exact_count_or_sampled_site_reaches_the_run_directory(
    user_run: dict[str, Any],
) -> None:
    """The user-level records of a record+user run (state.json, summary.json, the run's
    ledger) hold the released figures and ε, not the sites' update norms, the exact clipped
    count, or who and how many were sampled or contributed; the record-level figures of each
    site stay (its own ε, and the participation `audit verify` cross-checks them with)."""
    # Prepare
    run_dir, norms = user_run["dir"], user_run["norms"]
    texts = {
        name: (run_dir / name).read_text()
        for name in ("state.json", "summary.json", "ledger.jsonl")
    }
    state = json.loads(texts["state.json"])
    user = [
        r for r in Ledger(run_dir / "ledger.jsonl").records() if r["mechanism"] == USER_GAUSSIAN
    ]
    # Execute
    rounds = user_run["summary"]["user_level"]["rounds"] + state["user_dp"]["rounds"]
    spelled = {f for f in norm_spellings(norms) for text in texts.values() if f in text}
    # Assert
    assert len(norms) == 2 * SITES  # every site's update in both rounds was seen
    assert spelled == set()
    assert not any(key in r for r in rounds for key in WITHHELD)
    assert not any(key in r for r in user for key in ("sampled_sites", "contributors"))
    assert all(
        {"noise_multiplier", "update_noise_multiplier", "clip_norm", "expected_sites"} <= set(r)
        for r in user
    )
    assert all(r["epsilon"] is not None and "clipped_noisy" in r for r in rounds)
    summary = user_run["summary"]
    assert summary["user_level"]["participation_withheld"] is False
    assert [p["aggregated"] for p in summary["participation"]] == [list(range(SITES))] * 2


def test_user_level_budget_stops_the_run_before_it_is_exceeded(
    user_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The third round would pass the user-level budget: the run stops after two, cleanly,
    and the ledger (both levels) still verifies."""
    # Prepare
    from fedllm.cli import main as cli_main

    summary = user_run["summary"]
    # Execute
    code = cli_main(["audit", "verify", str(user_run["dir"])])
    out = capsys.readouterr().out
    # Assert
    assert summary["rounds_completed"] == 2 and summary["status"] == "stopped"
    assert "user-level DP (every site)" in summary["stop_reason"]
    assert summary["user_level"]["within_budget"] is True
    assert code == 0 and "FAIL" not in out


def test_audit_report_states_user_level_apart_from_each_site(
    user_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The report lists one record-level history per site and a separate user-level one."""
    # Prepare
    from fedllm.cli import main as cli_main

    # Execute
    code = cli_main(["audit", "report", str(user_run["dir"])])
    markdown = (user_run["dir"] / "audit-report.md").read_text()
    capsys.readouterr()
    # Assert
    assert code == 0 and "VERIFIED" in markdown
    assert "| user-level | DP-FedAvg Gaussian (server), user-level" in markdown
    assert all(f"| site {s} | DP-SGD (Opacus), record-level" in markdown for s in range(SITES))
