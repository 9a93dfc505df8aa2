"""Stage: only a fixed cohort of `eval.sites` sites evaluates, every round and round 0.

At a thousand sites, evaluating every one each round costs more than the training the
round samples, and a different random subset each round would make the rounds' held-out
loss incomparable. The cohort is drawn once from the connected sites by a permutation
seeded with `run.seed`, kept in `state.json`, and only topped up (in the same seeded order)
when one of its sites is no longer connected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedllm.strategy.base import Stage

__all__ = ["EvalCohort", "cohort"]


def cohort(nodes: Sequence[int], kept: Sequence[int], size: int, seed: int) -> list[int]:
    """`size` of `nodes`: the `kept` ones still connected, then the others in the order of
    a permutation seeded with `seed` (pure)."""
    present = set(nodes)
    connected = sorted(present)
    chosen = [n for n in kept if n in present][:size]
    # A permutation of positions, not of the ids: node ids are unsigned 64-bit, beyond
    # what numpy keeps exact in an int64 (or float) array.
    order = np.random.default_rng(seed).permutation(len(connected))
    chosen += [connected[i] for i in order if connected[i] not in chosen][: size - len(chosen)]
    return chosen


class EvalCohort(Stage):
    """Evaluate on the cohort only (`eval.sites` > 0)."""

    name = "eval-cohort"
    state_keys = ("eval_cohort",)
    summary_keys = ("evaluation",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.eval.sites > 0

    def summary_section(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {
            "evaluation": {
                "sites": self.cfg.eval.sites,
                "cohort": f"fixed, drawn with run.seed = {self.cfg.run.seed}",
            }
        }

    def plan(self) -> str | None:
        return f"evaluated on {self.cfg.eval.sites} sites"

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        chosen = cohort(
            [m.metadata.dst_node_id for m in messages],
            self.state.get("eval_cohort", []),
            self.cfg.eval.sites,
            self.cfg.run.seed,
        )
        self.state["eval_cohort"] = chosen
        keep = set(chosen)
        return [m for m in messages if m.metadata.dst_node_id in keep]
