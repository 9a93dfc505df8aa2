"""No reply content may crash the coordinator: a bad reply is rejected and named, the
others are aggregated, and the run's ledger and summary stay consistent (issue 15, item 5).

The replies go through the real stages around Flower's real FedAvg, as the loop hands them
over; only the SuperLink is left out (`tests.replies.mock_reply`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.verify import verify_records
from fedllm.strategy.loop import FederatedRun
from fedllm.wire import ARRAYS, METRICS, arrays_to_record
from tests.coordinator import coordinator_run
from tests.replies import mock_reply

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages


def _run(tiny_model_dir: Path, tmp_path: Path, **extra: Any) -> FederatedRun:
    return coordinator_run(tiny_model_dir, tmp_path, **{"run.min-sites": 1, **extra})


def _metrics(site: int, spent_rounds: list[int]) -> dict[str, Any]:
    """What a site's ClientApp reports after a record-level DP round (σ 1, q 0.3, 2 steps a
    round; its ε is the real one of that history, so the run ledger verifies)."""
    n = len(spent_rounds)
    eps = epsilon_report([(1.0, 0.3, 2)] * max(n, 1), delta=1e-3)
    return {
        "num-examples": 100,
        "site": site,
        "train-loss": 2.0,
        "train-seconds": 1.0,
        "steps": 2,
        "total-steps": 2 * n,
        "epsilon": float(eps["epsilon"]),
        "delta": 1e-3,
        "noise-multiplier": 1.0,
        "sample-rate": 0.3,
        "max-grad-norm": 1.0,
        **{f"epsilon-{m}": float(eps[m]) for m in MECHANISMS},
        "spent-rounds": spent_rounds,
        "spent-sigma": [1.0] * n,
        "spent-q": [0.3] * n,
        "spent-steps": [2] * n,
    }


def _reply(run: FederatedRun, site: int, metrics: dict[str, Any]) -> Message:
    arrays = {n: np.full(a.shape, 0.01 * (site + 1), np.float32) for n, a in run.ctx.arrays.items()}
    content = RecordDict({ARRAYS: arrays_to_record(arrays), METRICS: MetricRecord(metrics)})
    return mock_reply(content, node_id=site + 1)


def _aggregate(run: FederatedRun, server_round: int, replies: list[Message]) -> Any:
    assert run.strategy is not None
    arrays, _ = run.strategy.aggregate_train(server_round, replies)
    run._save()  # the summary must build from what was recorded
    return arrays


def test_replies_whose_spend_histories_differ_in_length_are_all_aggregated(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Site 1 missed round 1, so in round 2 its spend history is one round shorter; Flower's
    metric averaging zips such lists strictly and used to kill the coordinator."""
    # Prepare
    run = _run(tiny_model_dir, tmp_path)
    replies = [
        _reply(run, 0, _metrics(0, [1, 2])),
        _reply(run, 1, _metrics(1, [2])),
        _reply(run, 2, _metrics(2, [1, 2])),
    ]
    # Execute
    arrays = _aggregate(run, 2, replies)
    # Assert
    assert arrays is not None
    assert sorted(run.ctx.book.round("trains", 2)) == ["0", "1", "2"]
    assert verify_records(Ledger(run.ctx.run.ledger_path).records()) == []


def test_a_reply_with_an_extra_metric_is_aggregated(tiny_model_dir: Path, tmp_path: Path) -> None:
    # Prepare
    run = _run(tiny_model_dir, tmp_path)
    replies = [_reply(run, s, _metrics(s, [1])) for s in range(3)]
    replies[1].content[METRICS]["something-else"] = 1.0
    # Execute
    arrays = _aggregate(run, 1, replies)
    # Assert
    assert arrays is not None and len(run.ctx.book.round("trains", 1)) == 3


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"site": [0, 1]}, "site"),
        ({"train-loss": [2.0, 1.0]}, "train-loss"),
        ({"num-examples": None}, "num-examples"),
        ({"steps": -2}, "steps"),
        ({"epsilon-prv": float("nan")}, "epsilon-prv"),
        ({"spent-rounds": [1, 2, 3]}, "spent-"),
    ],
    ids=["list-site", "list-loss", "no-examples", "negative-steps", "nan-eps", "ragged-history"],
)
def test_a_malformed_reply_is_rejected_and_named_and_the_round_goes_on(
    tiny_model_dir: Path, tmp_path: Path, edit: dict[str, Any], named: str
) -> None:
    """The bad reply is left out with its reason under `rejected_updates`; the other two
    are aggregated, the run ledger still verifies and the summary builds."""
    # Prepare
    run = _run(tiny_model_dir, tmp_path)
    metrics = {**_metrics(1, [1]), **edit}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    replies = [_reply(run, 0, _metrics(0, [1])), _reply(run, 1, metrics)]
    replies.append(_reply(run, 2, _metrics(2, [1])))
    # Execute
    arrays = _aggregate(run, 1, replies)
    summary = run.summary()
    # Assert
    assert arrays is not None
    assert sorted(run.ctx.book.round("trains", 1)) == ["0", "2"]
    [rejected] = summary["rejected_updates"]
    assert rejected["round"] == 1 and named in rejected["reason"]
    assert verify_records(Ledger(run.ctx.run.ledger_path).records()) == []


def test_an_evaluation_reply_without_its_figures_is_rejected_not_a_crash(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    run = _run(tiny_model_dir, tmp_path)
    good = {"num-examples": 8, "site": 0, "eval-loss": 2.0, "perplexity": 7.4, "eval-tokens": 80}
    bad = {"num-examples": 8, "site": 1, "perplexity": 7.4}  # no eval-loss, no eval-tokens
    replies = [
        mock_reply(RecordDict({METRICS: MetricRecord(m)}), node_id=i + 1, phase="evaluate")
        for i, m in enumerate((good, bad))
    ]
    # Execute
    assert run.strategy is not None
    run.strategy.aggregate_evaluate(1, replies)
    summary = run.summary()
    # Assert
    assert list(run.ctx.book.round("evals", 1)) == ["0"]
    assert "eval-loss" in summary["rejected_updates"][0]["reason"]
    assert summary["eval_loss"] == [pytest.approx(2.0)]
