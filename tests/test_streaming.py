"""Streaming aggregation (issue 19): the coordinator folds each reply into a running sum as
it arrives, so it never holds a round's replies together, and the aggregate is the one
Flower's strategies compute from the whole list; a fixed evaluation cohort."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from clients.app import create_app
from fedllm.config import parse_config
from fedllm.errors import ConfigError, InvalidUpdateError
from fedllm.secure.instruction import config_digest
from fedllm.strategy.base import RunStopped
from fedllm.strategy.eval_cohort import cohort
from fedllm.strategy.streaming import RunningMean
from fedllm.wire import arrays_to_record, record_to_arrays
from server.app import main
from tests.coordinator import seeded_run, train_reply
from tests.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages

SITES = 12


def _replies(run: Any, n: int, alive: weakref.WeakSet, peak: list[int]) -> Iterator[Message]:
    """`n` distinct updates made one at a time, as a stream delivers them; `peak` records
    how many replies were alive (not yet freed) when each new one was made."""
    rng = np.random.default_rng(0)
    for site in range(n):
        gc.collect(0)  # a young generation pass frees what only cycles hold
        peak.append(len(alive))
        arrays = {
            k: a + rng.normal(0, 0.01, a.shape).astype(np.float32)
            for k, a in run.ctx.arrays.items()
        }
        reply = train_reply(run, site, arrays, num_examples=10 + site)
        alive.add(reply)
        yield reply


def _aggregate(run: Any, replies: Any) -> dict[str, np.ndarray]:
    """Round 1 configured (the server optimisers keep the global adapter then) and
    aggregated from `replies`."""
    grid = InProcessGrid(None, SITES)
    run.strategy.configure_train(1, arrays_to_record(run.ctx.arrays), ConfigRecord(), grid)
    arrays, _ = run.strategy.aggregate_train(1, replies)
    return record_to_arrays(arrays)


@pytest.mark.parametrize("rule", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"])
def test_the_streamed_aggregate_is_the_one_flower_computes_from_the_whole_list(
    rule: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    kw = {"strategy.name": rule}
    streamed_run = seeded_run(tiny_model_dir, tmp_path / "s", sites=SITES, **kw)
    listed_run = seeded_run(
        tiny_model_dir, tmp_path / "l", sites=SITES, **kw, **{"strategy.streaming": False}
    )
    replies = list(_replies(listed_run, SITES, weakref.WeakSet(), []))
    # Execute
    streamed = _aggregate(streamed_run, iter(replies))
    listed = _aggregate(listed_run, replies)
    # Assert
    assert streamed_run.pipeline.stage("streaming-mean").active
    assert not listed_run.pipeline.stage("streaming-mean").active
    for name in listed:
        np.testing.assert_allclose(streamed[name], listed[name], rtol=1e-5, atol=1e-7)


def test_a_streamed_round_holds_one_reply_at_a_time_and_a_listed_one_holds_them_all(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Through every stage (signatures, spends, validate, the fold), a reply is freed before
    the next is made; without streaming all of them are alive at the end."""
    # Prepare
    streamed_run = seeded_run(tiny_model_dir, tmp_path / "s", sites=SITES)
    listed_run = seeded_run(
        tiny_model_dir, tmp_path / "l", sites=SITES, **{"strategy.streaming": False}
    )
    streamed_alive, streamed_peak = weakref.WeakSet(), []
    listed_alive, listed_peak = weakref.WeakSet(), []
    # Execute
    _aggregate(streamed_run, _replies(streamed_run, SITES, streamed_alive, streamed_peak))
    _aggregate(listed_run, list(_replies(listed_run, SITES, listed_alive, listed_peak)))
    # Assert
    assert max(streamed_peak) <= 1
    assert listed_peak[-1] == SITES - 1


def test_too_few_valid_streamed_updates_stop_the_run_before_the_user_level_noise_is_spent(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The run.min-sites check is raised from the end of the validated stream, inside the
    user-level stage's fold: the round's spend is never written."""
    # Prepare
    run = seeded_run(
        tiny_model_dir,
        tmp_path,
        sites=SITES,
        **{"privacy.mode": "user", "run.min-sites": 3, "strategy.fraction-train": 0.5},
    )
    user = run.pipeline.stage("user-dp")
    user.report = {"epsilon": 1.0, **{m: 1.0 for m in ("rdp", "pld", "prv")}}
    user.sampled = [1, 2]
    replies = [train_reply(run, s) for s in range(2)]
    # Execute / Assert
    with pytest.raises(RunStopped, match="only 2 valid updates"):
        run.strategy.aggregate_train(1, iter(replies))
    assert run.ctx.ledger().records() == []


def test_running_mean_is_the_example_weighted_mean() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    updates = [({"a": rng.normal(size=(4, 3)).astype(np.float32)}, w) for w in (1, 5, 9)]
    running = RunningMean()
    # Execute
    for arrays, weight in updates:
        running.add(arrays, weight)
    # Assert
    expected = sum(w * a["a"].astype(np.float64) for a, w in updates) / 15
    np.testing.assert_allclose(running.mean()["a"], expected, rtol=1e-6)
    assert running.weight == 15 and running.count == 3


def test_the_evaluation_cohort_is_fixed_seeded_and_topped_up_only_for_departed_sites() -> None:
    nodes = list(range(100, 140))
    first = cohort(nodes, [], 5, seed=0)
    assert first == cohort(nodes, [], 5, seed=0) != cohort(nodes, [], 5, seed=1)
    assert cohort(nodes, first, 5, seed=0) == first
    gone = [n for n in nodes if n != first[2]]
    again = cohort(gone, first, 5, seed=0)
    assert again[:4] == [n for n in first if n != first[2]] and len(again) == 5
    assert sorted(cohort(nodes[:3], [], 5, seed=0)) == nodes[:3]  # fewer sites than asked
    flower_ids = [2**64 - 1 - i for i in range(10)]  # Flower's node ids are unsigned 64-bit
    assert set(cohort(flower_ids, [], 4, seed=0)) <= set(flower_ids)


def test_two_dozen_sites_stream_with_sampling_and_a_fixed_evaluation_cohort(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A real run (the real ServerApp and ClientApp in this process) of 24 tiny sites, a
    quarter sampled a round, 4 evaluating: the replies are pulled one at a time and folded,
    only the cohort evaluates, and the run completes."""
    # Prepare
    sites = 24
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "many",
        "run.output-dir": str(tmp_path),
        "run.rounds": 2,
        "run.min-sites": 3,
        "strategy.fraction-train": 0.25,
        "eval.sites": 4,
        "privacy.mode": "none",
        "data.partitioner": "iid",
        "train.local-steps": 1,
        "train.batch-size": 4,
        "eval.max-examples": 4,
    }
    grid = InProcessGrid(create_app(overrides), sites)
    # Execute
    main(grid, overrides, config_sha256=config_digest({}))
    # Assert
    summary = json.loads((tmp_path / "many" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["streaming"] is True
    assert summary["evaluation"]["sites"] == 4
    by_round = {p["round"]: p for p in summary["participation"]}
    for r in (1, 2):
        assert len(by_round[r]["aggregated"]) == 6
    evaluated = {
        s for s, v in summary["sites"].items() if any(x is not None for x in v["eval_loss"])
    }
    assert len(evaluated) == 4
    assert grid.pulls >= 2 * 6  # every training reply was pulled on its own
    assert summary["eval_loss"][-1] < summary["eval_loss"][0]


def test_a_site_outside_the_evaluation_cohort_cannot_raise_its_weight_after_its_first_update(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Round 0 fixes the weight ceiling only for the cohort; for the others the weight of
    their first accepted update does."""
    # Prepare
    run = seeded_run(tiny_model_dir, tmp_path, sites=2, **{"eval.sites": 2})
    validate = run.pipeline.stage("validate")
    run.ctx.book.record("trains", 1, 7, {"num-examples": 10, "site": 7})
    # Execute / Assert
    validate.check_weight(7, 10, "site 7")
    with pytest.raises(InvalidUpdateError, match="claims 11 examples but reported 10"):
        validate.check_weight(7, 11, "site 7")


def test_an_evaluation_cohort_is_refused_under_he_where_round_0_fixes_every_weight() -> None:
    with pytest.raises(ConfigError, match="'eval.sites' = 3: under HE"):
        parse_config({"strategy.secure-aggregation": "he", "eval.sites": 3})
