"""Stage (innermost): fold each update into a running weighted sum as its reply arrives.

Flower's FedAvg family (`aggregate_arrayrecords`) needs the round's replies together, so a
coordinator of 100 sites a round would hold 100 adapters at once. Every stage outside this
one passes replies on one at a time (`Transport.stream` pulls them as they come), and this
stage keeps only the sum and the total weight: the coordinator's memory does not grow with
the replies. The inner Flower strategy is then handed one reply, the example-weighted mean
with the round's total weight, which FedAvg returns as it is and FedAdam, FedYogi,
FedAdagrad, FedAvgM and FedProx treat exactly as their own average (their server step
reads only the mean). The robust rules need every update at once, and under HE the sum is
of ciphertexts (`fedllm.strategy.he_sum`), so neither streams.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedllm.strategy.base import Stage
from fedllm.strategy.flower import ROBUST_STRATEGIES
from fedllm.wire import ARRAYS, METRICS, NUM_EXAMPLES, arrays_to_record, record_to_arrays

__all__ = ["RunningMean", "StreamingMean", "one_reply"]


class RunningMean:
    """An example-weighted mean built one update at a time, in float64 (pure)."""

    def __init__(self) -> None:
        self.total: dict[str, np.ndarray] = {}
        self.weight = 0
        self.count = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: int) -> None:
        if not self.total:
            self.total = {n: np.zeros(np.shape(a), dtype=np.float64) for n, a in arrays.items()}
        for n, a in arrays.items():
            self.total[n] += weight * np.asarray(a, dtype=np.float64)
        self.weight += weight
        self.count += 1

    def mean(self) -> dict[str, np.ndarray]:
        return {n: (t / self.weight).astype(np.float32) for n, t in self.total.items()}


def one_reply(arrays: Mapping[str, np.ndarray], *, weight: int, node: int) -> Message:
    """A reply the inner Flower strategy aggregates as the round's only update."""
    content = RecordDict(
        {ARRAYS: arrays_to_record(dict(arrays)), METRICS: MetricRecord({NUM_EXAMPLES: weight})}
    )
    return Message(content=content, dst_node_id=node, message_type="train")


class StreamingMean(Stage):
    """The example-weighted mean of the round's updates, folded as they arrive."""

    name = "streaming-mean"
    summary_keys = ("streaming",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        s = cfg.strategy
        return s.streaming and s.name not in ROBUST_STRATEGIES and s.secure_aggregation != "he"

    def summary_section(self) -> dict[str, Any]:
        return {"streaming": self.active}

    def plan(self) -> str | None:
        return "(streaming)"

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        running, node = RunningMean(), 0
        for reply in replies:
            running.add(
                record_to_arrays(reply.content[ARRAYS]),
                int(reply.content[METRICS][NUM_EXAMPLES]),
            )
            node = reply.metadata.src_node_id
        if not running.count:
            return self.inner.aggregate_train(server_round, [])
        return self.inner.aggregate_train(
            server_round, [one_reply(running.mean(), weight=running.weight, node=node)]
        )
