"""Spends: a site's refusal is recorded and its reply left out; every record-level DP-SGD
spend a site reports goes into the run ledger, whether or not its update is then accepted
(the site trained, so the privacy was spent), after any earlier spend the ledger lacks.
A spend arrives with the site's own signed ledger record of it, which the run's record
holds as `site_record` (checked to state the same spend), so an auditor can check the run
ledger against the sites' keys without the sites' own ledgers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from logging import WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedllm.errors import UNREADABLE_REPLY
from fedllm.privacy.backfill import missing_spends
from fedllm.privacy.ledger import SITE_RECORD, dp_sgd_entry
from fedllm.privacy.signed_ledgers import check_same_spend
from fedllm.strategy.base import Stage
from fedllm.wire import METRICS, refusal_reason, reply_site, site_spend_record, spend_metrics

__all__ = ["Spends"]


class Spends(Stage):
    """Refusals out, spends into the run ledger (record-level DP)."""

    name = "spends"

    def record_spend(self, server_round: int, reply: Message) -> None:
        """Append the reply's spend (and any spend of earlier rounds the run ledger lacks)."""
        metrics = dict(reply.content[METRICS])
        sender = f"site {metrics.get('site')} (node {reply.metadata.src_node_id})"
        spend = spend_metrics(metrics, sender=sender) if self.cfg.privacy.record_level else None
        if spend is None:
            return
        run_id = self.cfg.run.name
        entry = dp_sgd_entry(run_id=run_id, server_round=server_round, **spend)
        site_record = site_spend_record(reply.content, sender=sender)
        if site_record is not None:
            check_same_spend(site_record, entry, sender=sender)
            entry[SITE_RECORD] = site_record
        ledger = self.ctx.ledger()
        for missing in missing_spends(
            ledger.records(), metrics, run_id=run_id, site=spend["site"], before_round=server_round
        ):
            log(WARNING, "fedllm: site %s: %s", spend["site"], missing["backfilled"])
            ledger.append_once(missing)
        # Once: a round redone after the coordinator died mid-round carries the site's same
        # (replayed) spend, already recorded by the attempt that died.
        ledger.append_once(entry)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, self._kept(server_round, replies))

    def _kept(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        """Each reply's spend recorded as it passes; refusals and bad spends left out."""
        for reply in replies:
            try:
                reason = refusal_reason(reply.content)
                if reason is not None:
                    site = reply_site(reply.content)
                    node = reply.metadata.src_node_id
                    log(
                        WARNING,
                        "fedllm: site %s (node %s) left out of round %d: %s",
                        site,
                        node,
                        server_round,
                        reason,
                    )
                    self.ctx.book.refuse(server_round, site, reason)
                    continue
                self.record_spend(server_round, reply)
            except UNREADABLE_REPLY as e:
                self.ctx.book.reject(server_round, reply, "train", e)
                continue
            yield reply
