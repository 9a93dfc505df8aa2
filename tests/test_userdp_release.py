"""At user level a run's files hold only what DP-FedAvg released: what the book, the summary,
a resumed stage and the ledger do with the figures the mechanism does not protect (the
end-to-end check of a real run is in tests/integration/test_userdp_release.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from fedllm.config import parse_config
from fedllm.model import adapter_spec
from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import Ledger, user_dp_entry
from fedllm.privacy.userdp import WITHHELD
from fedllm.privacy.verify import cross_check, verify_records
from fedllm.strategy.base import RunContext
from fedllm.strategy.book import RunBook
from fedllm.strategy.user_dp import UserDP
from fedllm.summary import build_summary, render_table
from fedllm.wire import METRICS, SITE
from tests.replies import mock_reply

# A round as the user-level stage recorded it before the unprotected figures were withheld.
OLD_ROUND = {
    "round": 1,
    "sampled": 3,
    "contributors": 3,
    "canary_clients": 0,
    "clipped": 2,
    "clip_norm": 0.5,
    "update_norms": [0.123456, 0.654321, 0.777777],
    "noise_std": 0.1,
    "epsilon": 2.0,
    "epsilon_by_accountant": {"prv": 2.0, "pld": 2.0, "rdp": 2.5},
}


def _context(tiny_model_dir: Path, mode: str) -> RunContext:
    cfg = parse_config({"model.name": str(tiny_model_dir), "privacy.mode": mode})
    return RunContext(cfg=cfg, spec=adapter_spec(cfg.model, cfg.lora), book=RunBook(), num_sites=3)


def _fill(book: RunBook) -> None:
    """Round 0's evaluations, then round 1: two sites trained, one was rejected, one did not
    answer, one refused, and one site failed to evaluate."""
    for site in range(3):
        book.record("evals", 0, site, {"eval-loss": 2.0, "eval-tokens": 10, "perplexity": 7.4})
        book.record("evals", 1, site, {"eval-loss": 1.9, "eval-tokens": 10, "perplexity": 6.7})
    for site in (0, 1):
        figures = {"train-loss": 1.5, "num-examples": 10, "epsilon": 1.0, "delta": 1e-5}
        book.record("trains", 1, site, {**figures, "noise-multiplier": 1.0})
    bad = mock_reply(RecordDict({METRICS: MetricRecord({SITE: 2})}), node_id=3)
    book.reject(1, bad, "train", ValueError("update norm 9.87654 above the bound"))
    book.fail(1, "train", 4, "no reply")
    book.fail(1, "evaluate", 5, "no reply")
    book.refuse(1, 1, "budget")
    book.add_bytes(1, up=2000, down=3000)


def test_a_user_level_book_keeps_who_trained_in_which_round_out_of_state_json(
    tiny_model_dir: Path,
) -> None:
    """With user-level DP only, the stage tells the book to withhold participation: the
    per-round training figures, training-phase rejections and failures, refusals and bytes
    stay out of `state_dict()` (state.json), while the round in progress still reads them."""
    # Prepare
    ctx = _context(tiny_model_dir, "user")
    UserDP(ctx)
    _fill(ctx.book)
    # Execute
    state = ctx.book.state_dict()
    # Assert
    assert ctx.book.participation_withheld
    assert {"trains", "refused", "bytes"}.isdisjoint(state)
    assert state["rejected"] == []
    assert [f["phase"] for f in state["failures"]] == ["evaluate"]
    assert "9.87654" not in json.dumps(state)
    assert set(ctx.book.round("trains", 1)) == {"0", "1"}  # in memory, for this round
    assert set(state["evals"]["0"]) == {"0", "1", "2"}


@pytest.mark.parametrize("mode", ["record", "record+user", "none"])
def test_record_level_and_non_dp_runs_keep_their_participation(
    mode: str, tiny_model_dir: Path
) -> None:
    """Without user-level DP, or with record-level DP beside it (each site's spends name its
    rounds in the run's ledger, and `audit verify` cross-checks the two), the book keeps
    every record and the summary names the sites aggregated in each round."""
    # Prepare
    ctx = _context(tiny_model_dir, mode)
    UserDP(ctx)
    _fill(ctx.book)
    # Execute
    summary = build_summary(ctx.cfg, ctx.book.state_dict(), run_dir="/x")
    # Assert
    assert not ctx.book.participation_withheld
    assert ctx.book.state_dict() == ctx.book.data
    (p,) = summary["participation"]
    assert p["aggregated"] == [0, 1] and p["rejected"] == [2] and p["refused"] == [1]


def test_the_summary_of_a_user_level_run_names_no_site_round_and_renders(
    tiny_model_dir: Path,
) -> None:
    """From a user-level run's state (rounds an older fedllm recorded included), summary.json
    holds no update norm, exact count or participation, says what it leaves out, and the
    table prints without a "rounds in" figure."""
    # Prepare
    ctx = _context(tiny_model_dir, "user")
    UserDP(ctx)
    _fill(ctx.book)
    state = {**ctx.book.state_dict(), "user_dp": {"clip_norm": 0.5, "rounds": [OLD_ROUND]}}
    stage = UserDP(ctx)
    stage.load_state_dict(state)
    # Execute
    summary = build_summary(
        ctx.cfg, {**state, **stage.state_dict()}, run_dir="/x", sections=stage.summary_section()
    )
    text = json.dumps(summary)
    table = render_table(summary)
    # Assert
    user = summary["user_level"]
    assert not set(WITHHELD) & set(user["rounds"][0])
    assert user["rounds"][0]["epsilon"] == 2.0 and user["clip_norm"] == [0.5]
    assert user["participation_withheld"] is True and "not protect" in user["not_recorded"]
    assert summary["participation"] == [] and summary["refused"] == []
    assert all(info["train_loss"] == {} for info in summary["sites"].values())
    assert not any(f"{n}" in text for n in OLD_ROUND["update_norms"])
    assert set(table.columns[2].cells) == {"-"}


def test_a_resumed_user_level_stage_drops_what_older_rounds_recorded(
    tiny_model_dir: Path,
) -> None:
    """A run directory written before the withheld figures were withheld resumes with a
    state.json that no longer carries them; everything released is kept."""
    # Prepare
    stage = UserDP(_context(tiny_model_dir, "record+user"))
    # Execute
    stage.load_state_dict({"user_dp": {"clip_norm": 0.6, "rounds": [dict(OLD_ROUND)]}})
    (kept,) = stage.state_dict()["user_dp"]["rounds"]
    # Assert
    assert kept == {k: v for k, v in OLD_ROUND.items() if k not in WITHHELD}


def _user_record(server_round: int, **old: Any) -> dict[str, Any]:
    report = epsilon_report([(1.0, 0.5, 1)] * server_round, delta=1e-5)
    return user_dp_entry(
        run_id="r",
        server_round=server_round,
        noise_multiplier=1.0,
        update_noise_multiplier=1.0,
        sample_rate=0.5,
        clip_norm=1.0,
        clipping="fixed",
        expected_sites=5.0,
        delta=1e-5,
        epsilons={m: float(report[m]) for m in MECHANISMS},
        **old,
    )


def test_a_user_level_record_names_no_site_and_older_ones_that_did_still_verify(
    tmp_path: Path,
) -> None:
    """A caller that still passes the sampled sites and their number (distributed DP under
    HE does) gets a record without them; a ledger whose older records carry them (written
    before) still verifies and cross-checks against a summary with no participation."""
    # Prepare
    new = _user_record(2, sampled_sites=[0, 3], contributors=2)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    old = _user_record(1)
    ledger.append({**old, "sampled_sites": [1, 4], "contributors": 2})  # as written before
    ledger.append(new)
    summary = {"privacy": {"mode": "user"}, "participation": [], "epsilon": {}}
    # Execute
    records = ledger.records()
    # Assert
    assert not {"sampled_sites", "contributors"} & set(new)
    assert {"noise_multiplier", "sample_rate", "clip_norm", "expected_sites"} <= set(new)
    assert verify_records(records) == []
    assert cross_check(records, {}, summary) == []
    assert np.isclose(records[-1]["guarantee"], new["guarantee"])
