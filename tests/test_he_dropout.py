"""The coordinator's handling of a distributed-DP round under HE when noise shares are missing.

Real contexts, real ciphertexts, the real `FederatedRun`, its stages and ledger; no Flower
messaging (the round's replies are handed to the stages as they would arrive), so every
policy can be forced deterministically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger
from fedllm.privacy.verify import verify_records
from fedllm.secure.he import SECRET_CONTEXT, payload_digest
from fedllm.secure.he_site import SiteHE
from fedllm.strategy.base import RoundDiscarded, RunStopped
from fedllm.strategy.loop import FederatedRun
from fedllm.strategy.user_dp import user_budget
from fedllm.wire import ARRAYS, HE, HE_WEIGHT, METRICS, NUM_EXAMPLES, SITE, ciphertexts_to_record
from tests.coordinator import coordinator_run, he_settings
from tests.replies import mock_reply

SIGMA = 1.0


def _run(tiny_model_dir: Path, he_keys: Path, out: Path, **extra: Any) -> FederatedRun:
    overrides = {
        "privacy.mode": "user",
        "privacy.user-noise-multiplier": SIGMA,
        **he_settings(he_keys),
        # the dropout policies, at every share present (the curious-site accounting,
        # the default, is pinned in tests/test_distributed_dp_assumption.py)
        "he.noise-assumption": "honest-sites",
        **extra,
    }
    run = coordinator_run(tiny_model_dir, out, **overrides)
    run.pipeline.stage("he-sum").open_round()
    return run


def _two_of_three(run: FederatedRun) -> list[Message]:
    """A round's replies from sites 0 and 1 only (site 2 dropped)."""
    site = SiteHE.load(run.cfg, run.cfg.he.site_context, site=0)
    replies = []
    for s in (0, 1):
        update = {n: np.full(shape, 0.01 * (s + 1)) for n, shape in run.ctx.expected.items()}
        blobs = site.seal(update, weight=1 / 3, num_sites=3)
        content = RecordDict(
            {
                ARRAYS: ciphertexts_to_record(blobs),
                METRICS: MetricRecord(
                    {
                        SITE: s,
                        NUM_EXAMPLES: 10,
                        HE_WEIGHT: 1 / 3,
                        "train-loss": 1.0,
                        "epsilon": float("inf"),  # no record-level DP in this run
                        "delta": 0.0,
                        "noise-multiplier": 0.0,
                    }
                ),
                HE: ConfigRecord({"key-id": site.key, "sha256": payload_digest(blobs)}),
            }
        )
        replies.append(mock_reply(content, node_id=s + 1))
    return replies


def _aggregate(run: FederatedRun, replies: list[Message]) -> Any:
    """The round's replies through the stages, as the loop hands them over."""
    assert run.strategy is not None
    return run.strategy.aggregate_train(1, replies)


def test_abort_policy_discards_the_round_unread_and_spends_nothing(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model_dir, he_keys, tmp_path, **{"he.on-dropout": "abort"})
    with pytest.raises(RoundDiscarded, match="abort") as discarded:  # the round goes on
        _aggregate(run, _two_of_three(run))
    run.pipeline.round_discarded(1, discarded.value)
    he = run.pipeline.stage("he-sum")
    assert he.global_blobs is None  # the global adapter stays as it was
    assert "abort" in run.state_dict()["secure_aggregation"]["rounds"][0]["aborted"]
    assert Ledger(run.ctx.run.path / "ledger.jsonl").records() == []


def test_account_policy_records_the_noise_actually_present(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model_dir, he_keys, tmp_path)
    arrays, _ = _aggregate(run, _two_of_three(run))
    assert arrays is not None
    records = Ledger(run.ctx.run.path / "ledger.jsonl").records()
    z = SIGMA * math.sqrt(2 / 3)
    assert [r["mechanism"] for r in records] == [USER_GAUSSIAN]
    assert records[0]["noise_multiplier"] == pytest.approx(z)
    assert records[0]["planned_noise_multiplier"] == SIGMA
    assert records[0]["guarantee"] == pytest.approx(
        epsilon_report([(z, 1.0, 1)], delta=1e-5)["epsilon"]
    )
    assert verify_records(records) == []
    he = run.pipeline.stage("he-sum")
    assert he.global_blobs is not None and he.divisor == pytest.approx(2 / 3)


def test_budget_that_only_the_planned_noise_meets_stops_the_run_unreleased(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    """The budget allows one round at σ but not at σ·sqrt(2/3): the round with a dropped
    site is not released and the run stops, instead of recording more ε than allowed."""
    planned = float(epsilon_report([(SIGMA, 1.0, 1)], delta=1e-5)["epsilon"])
    run = _run(tiny_model_dir, he_keys, tmp_path, **{"privacy.user-epsilon-max": planned + 1e-6})
    user_budget(run.ctx, 1, SIGMA, 1.0)  # the best case (every share) is within budget
    with pytest.raises(RunStopped, match="budget"):
        _aggregate(run, _two_of_three(run))
    assert run.pipeline.stage("he-sum").global_blobs is None
    assert Ledger(run.ctx.run.path / "ledger.jsonl").records() == []


def test_server_given_the_secret_context_refuses_to_start(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    from fedllm.errors import KeyFileError

    with pytest.raises(KeyFileError, match="holds the CKKS secret key"):
        _run(
            tiny_model_dir,
            he_keys,
            tmp_path,
            **{"he.public-context": str(he_keys / SECRET_CONTEXT)},
        )
