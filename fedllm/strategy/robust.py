"""Robust rules (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan: Flower's own) are
handed updates, not adapters, and a round with too few updates for the rule's guarantee is
discarded, never aggregated without it.

Why updates: Flower's Krum scores squared distances as ‖x‖² + ‖y‖² − 2x·y in the arrays'
own float32. On whole adapters, whose norms dwarf a round's change, that cancels to noise
(distances of −1e-4 beside true ones of 4e-5 on a 200k-parameter adapter), so Krum would
pick at random. Every rule here commutes with a shift (median, trimmed mean, Krum's choice,
Bulyan's), so aggregating the updates and adding the global adapter back is the same rule
without the cancellation.

Why discard: below n = 2f + 3 (Krum) or 4f + 3 (Bulyan) the rule no longer tolerates the
f hostile sites it is configured for (Flower's Bulyan then returns nothing, and the round
would silently keep the old adapter); the round is discarded, named, and the run goes on.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedllm.errors import ConfigError
from fedllm.strategy.base import RoundDiscarded, Stage
from fedllm.strategy.flower import ROBUST_STRATEGIES, krum_select, min_replies, sample_size
from fedllm.wire import ARRAYS, arrays_to_record, record_to_arrays, with_arrays

__all__ = ["RobustRule"]


class RobustRule(Stage):
    """Around a robust Flower strategy: updates in, global + robust aggregate out."""

    name = "robust-rule"
    state_keys = ("robust_rule",)
    summary_keys = ("robust_aggregation",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.strategy.name in ROBUST_STRATEGIES

    def summary_section(self) -> dict[str, Any]:
        if not self.active:
            return {}
        s = self.cfg.strategy
        need, _ = min_replies(self.cfg)
        section: dict[str, Any] = {"rule": s.name, "min_updates": need, "aggregates": "updates"}
        if s.name in ("krum", "multikrum", "bulyan", "fedmedian"):
            section["tolerated_sites"] = s.tolerated_sites
        if s.name == "fedtrimmedavg":
            section["trim_beta"] = s.trim_beta
        if s.name == "multikrum":
            section["krum_select"] = krum_select(self.cfg, self.ctx.num_sites)
        section["discarded_rounds"] = self.state.get("robust_rule", {}).get("discarded", [])
        return {"robust_aggregation": section}

    def plan(self) -> str:
        return f"(robust: {self.cfg.strategy.name} on updates)"

    def begin(self) -> None:
        """Refuse, before any site trains, a federation too small for the rule's claim."""
        n = sample_size(self.cfg, self.ctx.num_sites)
        need, why = min_replies(self.cfg)
        where = (
            f"a round asks {n} of the {self.ctx.num_sites} connected sites "
            "(strategy.fraction-train, run.min-sites)"
        )
        if n < need:
            raise ConfigError(f"strategy.name = {self.cfg.strategy.name!r}: {why}, but {where}.")
        if self.cfg.strategy.name == "multikrum" and krum_select(self.cfg, self.ctx.num_sites) > n:
            raise ConfigError(
                f"strategy.krum-select = {self.cfg.strategy.krum_select} is more than {where}."
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        need, why = min_replies(self.cfg)
        if len(replies) < need:
            self.state.setdefault("robust_rule", {}).setdefault("discarded", []).append(
                server_round
            )
            reason = (
                f"round {server_round}: {len(replies)} valid updates; {why}: the round is "
                "discarded and the global adapter kept"
            )
            log(WARNING, "fedllm: %s", reason)
            raise RoundDiscarded(reason)
        current = self.ctx.arrays
        updates = [
            with_arrays(
                r, {n: a - current[n] for n, a in record_to_arrays(r.content[ARRAYS]).items()}
            )
            for r in replies
        ]
        aggregate, metrics = self.inner.aggregate_train(server_round, updates)
        if aggregate is None:
            return None, metrics
        robust_update = record_to_arrays(aggregate)
        return arrays_to_record({n: current[n] + robust_update[n] for n in current}), metrics
