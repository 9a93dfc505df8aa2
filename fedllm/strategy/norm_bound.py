"""Norm bounding: every site's update (its adapter minus the global one) is clipped to
`strategy.norm-bound` in L2 before any rule aggregates it (Sun et al. 2019, "Can you
really backdoor federated learning?"): a site that scales its update up to dominate the
average is cut down to what an honest site may contribute. It runs on plaintext updates
only (the config refuses it under HE) and with every rule, FedAvg included; under
user-level DP it is a second clip before the noise, so the sensitivity the accountant
assumes (privacy.user-clip) still bounds the sum."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedllm.privacy.userdp import clip_update
from fedllm.strategy.base import Stage
from fedllm.summary import participation_withheld
from fedllm.wire import ARRAYS, record_to_arrays, with_arrays

__all__ = ["NormBound", "bound_update"]


def bound_update(
    arrays: dict[str, Any], reference: dict[str, Any], bound: float
) -> tuple[dict[str, Any], bool]:
    """`arrays` moved so that its distance from `reference` is at most `bound` (float32,
    as updates travel), and whether it had to be moved."""
    delta = {n: arrays[n].astype("float64") - reference[n] for n in reference}
    clipped, norm = clip_update(delta, bound)
    bounded = {n: (reference[n] + clipped[n]).astype("float32") for n in reference}
    return bounded, norm > bound


class NormBound(Stage):
    """Clip each valid update to the configured L2 norm; count how many were clipped."""

    name = "norm-bound"
    state_keys = ("norm_bound",)
    summary_keys = ("norm_bound",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.strategy.norm_bound > 0

    def summary_section(self) -> dict[str, Any]:
        if not self.active:
            return {}
        return {"norm_bound": {"bound": self.cfg.strategy.norm_bound, **self.state_dict()}}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, self._bounded(server_round, replies))

    def _bounded(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """Each update clipped as it passes; the round's count recorded after the last."""
        bound = self.cfg.strategy.norm_bound
        updates, clipped = 0, 0
        for reply in replies:
            arrays, moved = bound_update(
                record_to_arrays(reply.content[ARRAYS]), self.ctx.arrays, bound
            )
            clipped += moved
            updates += 1
            yield with_arrays(reply, arrays)
        # Under user-level DP how many sites took part (and so how many were clipped) is
        # not released: only the noisy sum is.
        if not participation_withheld(self.cfg):
            rounds = self.state.setdefault("norm_bound", {}).setdefault("rounds", [])
            rounds.append({"round": server_round, "updates": updates, "clipped": clipped})
            log(
                INFO,
                "fedllm: [round %d] norm bound %g: %d of %d updates clipped",
                server_round,
                bound,
                clipped,
                updates,
            )
