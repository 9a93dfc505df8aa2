"""Send messages to the sites and collect their replies: bytes on the wire, failures, and
the site's own one-line error out of Flower's wrapped error text."""

from __future__ import annotations

from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.strategy.book import RunBook
from fedllm.wire import ARRAYS, record_bytes

__all__ = ["Transport", "error_reason"]


def error_reason(text: str | None) -> str:
    """The site's own one-line message out of Flower's wrapped error text."""
    if not text:
        return "unknown error"
    text = text.strip()
    marker = "Message: "
    if marker in text:
        text = text[text.rindex(marker) + len(marker) :]
    return text.strip().splitlines()[0].rstrip("'>")


class Transport:
    """One round trip over the grid; what went wrong is written to the book."""

    def __init__(self, grid: Grid, book: RunBook, *, timeout: float) -> None:
        self.grid, self.book, self.timeout = grid, book, timeout

    def send(self, messages: list[Message], phase: str, server_round: int) -> list[Message]:
        """Send, wait up to `timeout`, and return the replies that carry no error; every
        site that failed or did not answer is logged and recorded under `failures`."""
        if not messages:
            return []
        down = sum(record_bytes(m.content[ARRAYS]) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        up = sum(
            record_bytes(r.content[ARRAYS])
            for r in replies
            if not r.has_error() and ARRAYS in r.content.array_records
        )
        self.book.add_bytes(server_round, up=up, down=down)
        ok = [r for r in replies if not r.has_error()]
        errors = {
            r.metadata.reply_to_message_id: error_reason(r.error.reason)
            for r in replies
            if r.has_error()
        }
        answered = {r.metadata.src_node_id for r in ok}
        missing = [m for m in messages if m.metadata.dst_node_id not in answered]
        for m in missing:
            node = m.metadata.dst_node_id
            # A dead node's error reply comes from the SuperLink (src 1), so the node and its
            # site are named from what was sent, not from the reply.
            reason = errors.get(m.metadata.message_id) or (
                next(iter(errors.values()))
                if len(errors) == 1 and len(missing) == 1
                else f"no reply within run.timeout = {self.timeout:g}s"
            )
            site = self.book.site_of(node)
            log(
                WARNING,
                "fedllm: %s failed in %s round %d: %s",
                f"site {site} (node {node})" if site is not None else f"node {node}",
                phase,
                server_round,
                reason,
            )
            self.book.fail(server_round, phase, node, reason)
        return ok
