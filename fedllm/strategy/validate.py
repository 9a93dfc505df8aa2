"""Validate: every update is checked before it may touch the aggregate, the figures of the
accepted ones are recorded, and a round with fewer valid updates than `run.min-sites`
stops the run with the last global adapter."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from logging import ERROR, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.errors import UNREADABLE_REPLY, InvalidUpdateError
from fedllm.strategy.base import RunContext, RunStopped, Stage
from fedllm.validate import WIRE_DTYPE, check_update
from fedllm.wire import (
    ARRAYS,
    EVALUATE_FIGURES,
    METRICS,
    NUM_EXAMPLES,
    SITE,
    TRAIN_FIGURES,
    check_figures,
    record_to_arrays,
    refusal_reason,
    reply_site,
)

__all__ = ["Validate"]


class Validate(Stage):
    """Names, shapes, dtypes and finite values of plaintext updates (or, under HE, the
    check of the stage that can read the ciphertexts), then run.min-sites."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.sent: dict[int, int] = {}

    name = "validate"
    summary_keys = ("validation",)

    def summary_section(self) -> dict[str, Any]:
        v = self.cfg.validate
        return {
            "validation": {
                "max_update_norm": v.max_update_norm,
                "max_examples": v.max_examples,
                "weights": "at most each site's training examples reported before round 1",
                "dtype": str(WIRE_DTYPE),
            }
        }

    def check_weight(self, site: int, num_examples: int, sender: str) -> None:
        """A FedAvg weight is positive and no more than the site's own count, fixed before
        round 1 (its evaluation of the initial adapter; outside an `eval.sites` cohort, its
        first accepted update), nor than validate.max-examples."""
        if num_examples <= 0:
            raise InvalidUpdateError(
                f"{sender}: metric 'num-examples' = {num_examples} is not positive."
            )
        own = self.ctx.book.own_count(site)
        if own is not None and num_examples > own:
            raise InvalidUpdateError(
                f"{sender}: claims {num_examples} examples but reported {own} before round 1 "
                "(outside the evaluation cohort: with its first update)."
            )
        ceiling = self.cfg.validate.max_examples
        if num_examples > ceiling:
            raise InvalidUpdateError(
                f"{sender}: claims {num_examples} examples, above validate.max-examples = "
                f"{ceiling}."
            )

    def check(self, reply: Message, sender: str) -> None:
        """Raise `InvalidUpdateError` unless the reply carries every figure the run reads,
        a valid weight and a valid update."""
        metrics = reply.content[METRICS]
        check_figures(metrics, TRAIN_FIGURES, sender=sender)
        self.check_weight(reply_site(reply.content), int(metrics[NUM_EXAMPLES]), sender)
        if self.ctx.update_check is not None:
            self.ctx.update_check(reply, sender)
            return
        try:
            arrays = record_to_arrays(reply.content[ARRAYS])
        except InvalidUpdateError as e:  # its bytes are no array: named with the sender
            raise InvalidUpdateError(f"{sender}: {e}") from e
        check_update(
            arrays,
            self.ctx.expected,
            sender=sender,
            reference=self.ctx.arrays,
            max_norm=self.cfg.validate.max_update_norm,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.sent[server_round] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, self._valid(server_round, replies))

    def _valid(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """The valid updates, one at a time; once the last has passed, and before whatever
        consumes them can finish (noise, spend or adopt an aggregate), too few of them stop
        the run: the check is raised from the end of this iterator, inside the consumer."""
        book = self.ctx.book
        valid = 0
        for reply in replies:
            try:
                site = reply_site(reply.content)
                self.check(reply, f"site {site} (node {reply.metadata.src_node_id})")
            except UNREADABLE_REPLY as e:
                book.reject(server_round, reply, "train", e)
                continue
            book.record("trains", server_round, site, dict(reply.content[METRICS]))
            valid += 1
            yield _for_aggregation(reply)
        needed = self.cfg.run.min_sites
        if self.ctx.sampled_by_design:  # Poisson sampling may pick fewer sites by design
            needed = min(needed, self.sent.get(server_round, needed))
        if valid < needed:
            reason = (
                f"round {server_round}: only {valid} valid updates "
                f"({book.count('refused', server_round)} sites refused for their privacy "
                f"budget, {book.count('rejected', server_round)} updates rejected, "
                f"{book.count('failures', server_round)} sites did not answer), fewer than "
                f"run.min-sites = {self.cfg.run.min_sites}; stopping with the last global adapter."
            )
            log(ERROR, "fedllm: %s", reason)
            raise RunStopped(reason)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Each site's figures go into the run's book (the summary weights them by tokens);
        Flower's metric averaging is not used, so no stage further in sees evaluations."""
        for reply in replies:
            try:
                site = reply_site(reply.content)
                reason = refusal_reason(reply.content)
                if reason is not None:  # the site's policy: recorded, never an error
                    log(WARNING, "fedllm: site %s refused round %d: %s", site, server_round, reason)
                    self.ctx.book.refuse(server_round, site, reason)
                    continue
                metrics = dict(reply.content[METRICS])
                sender = f"site {site} (node {reply.metadata.src_node_id})"
                check_figures(metrics, EVALUATE_FIGURES, sender=sender)
            except UNREADABLE_REPLY as e:
                self.ctx.book.reject(server_round, reply, "evaluate", e)
                continue
            self.ctx.book.record("evals", server_round, site, metrics)
        return None


def _for_aggregation(reply: Message) -> Message:
    """The reply as the stages further in and the Flower strategy see it: the update, its
    weight and its site. Flower's metric averaging (which fedllm does not use: each site's
    figures are in the run's book) refuses replies whose metrics differ in keys or list
    lengths, so a site that missed a round would otherwise stop the coordinator."""
    metrics = reply.content[METRICS]
    content = RecordDict(
        {
            ARRAYS: reply.content[ARRAYS],
            METRICS: MetricRecord({NUM_EXAMPLES: metrics[NUM_EXAMPLES], SITE: metrics[SITE]}),
            **{name: record for name, record in reply.content.config_records.items()},
        }
    )
    return Message(content=content, metadata=reply.metadata)
