"""The contract every registered coordinator stage keeps (`fedllm.strategy`): disabled, it
is not in the message path and replies reach the inner strategy unchanged; it restores
exactly the state it owns; it writes only its own summary sections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedllm.config import parse_config
from fedllm.model import adapter_spec
from fedllm.secure.he import PUBLIC_CONTEXT, SECRET_CONTEXT
from fedllm.strategy.base import RunContext, Stage
from fedllm.strategy.book import RunBook
from fedllm.strategy.loop import LOOP_KEYS
from fedllm.strategy.pipeline import STAGES, Pipeline, register_stage, unregister_stage
from fedllm.summary import SECTION_DEFAULTS, SUMMARY_KEYS, build_summary
from fedllm.wire import ARRAYS, METRICS, NUM_EXAMPLES, SITE, arrays_to_record
from tests.coordinator import Recorder
from tests.replies import mock_reply


def _context(tiny_model_dir: Path, **overrides: Any) -> RunContext:
    cfg = parse_config({"model.name": str(tiny_model_dir), **overrides})
    spec = adapter_spec(cfg.model, cfg.lora)
    ctx = RunContext(cfg=cfg, spec=spec, book=RunBook(), num_sites=3)
    ctx.arrays = {n: np.zeros(spec.shapes[n], np.float32) for n in spec.sent}
    return ctx


def _train_reply(ctx: RunContext, site: int) -> Message:
    content = RecordDict(
        {
            ARRAYS: arrays_to_record(ctx.arrays),
            METRICS: MetricRecord(
                {
                    SITE: site,
                    NUM_EXAMPLES: 10,
                    "train-loss": 1.0,
                    "epsilon": float("inf"),
                    "delta": 0.0,
                    "noise-multiplier": 0.0,
                }
            ),
        }
    )
    return mock_reply(content, node_id=site + 1)


def _enabling(stage: type[Stage], he_keys: Path) -> dict[str, Any]:
    """A run config under which `stage` acts (the always-on stages: the default)."""
    he = {
        "strategy.secure-aggregation": "he",
        "he.public-context": str(he_keys / PUBLIC_CONTEXT),
        "he.site-context": str(he_keys / SECRET_CONTEXT),
    }
    return {
        "he-sum": he,
        "distributed-dp": {**he, "privacy.mode": "user"},
        "user-dp": {"privacy.mode": "user"},
        "safety-gate": {"safety.screen-every": 1},
        "eval-cohort": {"eval.sites": 2},
    }.get(stage.name, {})


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_a_disabled_stage_passes_replies_through_unchanged(
    stage: type[Stage], tiny_model_dir: Path
) -> None:
    """Under a run that asks for none of the optional mechanisms, a stage that is disabled
    is not in the chain, and a valid reply reaches the inner strategy with the same update
    from the same node (the validate stage hands on only the update, its weight and site)."""
    # Prepare
    ctx = _context(tiny_model_dir, **{"privacy.mode": "none", "strategy.streaming": False})
    pipeline = Pipeline(ctx)
    inner = Recorder()
    outer = pipeline.build(inner)
    replies = [_train_reply(ctx, s) for s in range(3)]
    # Execute
    outer.aggregate_train(1, replies)
    # Assert
    instance = pipeline.stage(stage.name)
    assert (instance in pipeline.active) is stage.enabled(ctx.cfg)
    assert len(inner.train) == len(replies)
    for got, sent in zip(inner.train, replies, strict=True):
        assert got.content[ARRAYS] is sent.content[ARRAYS]
        assert got.metadata is sent.metadata
        assert dict(got.content[METRICS]) == {NUM_EXAMPLES: 10, SITE: sent.content[METRICS][SITE]}


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_restores_exactly_the_state_it_owns(
    stage: type[Stage], tiny_model_dir: Path, he_keys: Path
) -> None:
    """`load_state_dict` takes the stage's own keys from a whole state.json and ignores the
    rest; a fresh stage loaded from its `state_dict` has the same state."""
    # Prepare
    ctx = _context(tiny_model_dir, **_enabling(stage, he_keys))
    saved = {k: {"owned-by": stage.name, "rounds": [1, 2]} for k in stage.state_keys}
    whole = {**saved, "someone-else": {"x": 1}, "rounds_completed": 2}
    first = stage(ctx)
    # Execute
    first.load_state_dict(whole)
    second = stage(ctx)
    second.load_state_dict(first.state_dict())
    # Assert
    assert first.state_dict() == saved
    assert second.state_dict() == saved
    assert not set(stage.state_keys) & (set(LOOP_KEYS) | {"evals", "trains"})


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_writes_only_its_own_summary_sections(
    stage: type[Stage], tiny_model_dir: Path, he_keys: Path
) -> None:
    """Enabled or not, a stage's summary sections are among its declared `summary_keys`, and
    every key it declares is a summary.json key with a default for runs without it."""
    # Prepare
    for overrides in ({}, _enabling(stage, he_keys)):
        ctx = _context(tiny_model_dir, **overrides)
        instance = stage(ctx)
        if instance.active:
            instance.begin()
        # Execute
        section = instance.summary_section()
        # Assert
        assert set(section) <= set(stage.summary_keys), stage.name
    assert set(stage.summary_keys) <= set(SECTION_DEFAULTS) <= set(SUMMARY_KEYS)


def test_no_two_stages_write_the_same_section_in_one_run(
    tiny_model_dir: Path, he_keys: Path
) -> None:
    """Sections that two stages declare (user_level: user-level or distributed DP) are
    written by at most one of them in any run."""
    for stage in STAGES:
        ctx = _context(tiny_model_dir, **_enabling(stage, he_keys))
        pipeline = Pipeline(ctx)
        written = [key for s in pipeline.stages for key in s.summary_section()]
        assert len(written) == len(set(written)), stage.name
        summary = build_summary(ctx.cfg, {}, run_dir="/x", sections=pipeline.summary_sections())
        assert list(summary)[: len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)


def test_a_stage_name_is_registered_once(tiny_model_dir: Path) -> None:
    """Registering a second stage under a taken name is refused unless forced."""

    class Twin(Stage):
        name = "validate"

    with pytest.raises(ValueError, match="already registered"):
        register_stage(Twin)
    with pytest.raises(ValueError, match="no stage named 'nosuch'"):
        register_stage(type("Other", (Stage,), {"name": "other"}), after="nosuch")
    unregister_stage("other")
    assert [s.name for s in STAGES].count("validate") == 1
