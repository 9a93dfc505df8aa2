"""The extension point: a new per-round mechanism is one stage class and one registration
line, and a real simulated run carries it (its state in state.json, its summary section)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, Message, MetricRecord

from fedllm.strategy.base import Stage
from fedllm.strategy.pipeline import register_stage, unregister_stage
from fedllm.wire import ARRAYS, record_bytes, reply_site
from tests.simulate import simulate

pytestmark = pytest.mark.slow


class ReplySizes(Stage):
    """Records the bytes of every training reply that reaches it, per round and site."""

    name = "reply-sizes"
    state_keys = ("reply_sizes",)
    summary_keys = ("reply_sizes",)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sizes = self.state.setdefault("reply_sizes", {})
        sizes[str(server_round)] = {
            str(reply_site(r.content)): record_bytes(r.content[ARRAYS]) for r in replies
        }
        return self.inner.aggregate_train(server_round, replies)

    def summary_section(self) -> dict[str, Any]:
        return {"reply_sizes": self.state.get("reply_sizes", {})}


@pytest.fixture
def registered() -> Iterator[None]:
    register_stage(ReplySizes, after="validate")  # the one registration line
    try:
        yield
    finally:
        unregister_stage(ReplySizes.name)


def test_a_registered_stage_runs_in_a_simulation_and_writes_its_section(
    registered: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "extended",
        "run.output-dir": str(tmp_path),
        "run.rounds": 1,
        "train.local-steps": 1,
        "privacy.mode": "none",
        "eval.max-examples": 4,
    }
    # Execute
    simulate(overrides, sites=3)
    run_dir = tmp_path / "extended"
    summary = json.loads((run_dir / "summary.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    # Assert
    assert summary["status"] == "completed"
    sizes = summary["reply_sizes"]["1"]
    assert sorted(sizes) == ["0", "1", "2"]
    round_1 = next(e for e in summary["bytes_per_round"] if e["round"] == 1)
    assert sum(sizes.values()) == round_1["up"]
    assert state["reply_sizes"] == summary["reply_sizes"]
