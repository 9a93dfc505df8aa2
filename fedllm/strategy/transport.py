"""Send messages to the sites and collect their replies: bytes on the wire, failures, and
the site's own one-line error out of Flower's wrapped error text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from logging import WARNING

from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.strategy.book import RunBook
from fedllm.wire import ARRAYS, record_bytes

__all__ = ["Transport", "error_reason"]

# How often a streaming round asks for replies: quickly while they arrive, backing off to
# POLL_MAX while none does (each pull is one request to the SuperLink; Flower's in-memory
# grid polls every 0.1 s, its deployment grid every 3 s).
POLL_MIN, POLL_MAX = 0.02, 0.1


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
        self.book.add_bytes(server_round, up=sum(map(_up_bytes, replies)), down=down)
        ok = [r for r in replies if not r.has_error()]
        errors = {
            r.metadata.reply_to_message_id: error_reason(r.error.reason)
            for r in replies
            if r.has_error()
        }
        answered = {r.metadata.src_node_id for r in ok}
        self._record_missing(messages, answered, errors, phase, server_round)
        return ok

    def stream(self, messages: list[Message], phase: str, server_round: int) -> Iterator[Message]:
        """Send, then yield each reply that carries no error as soon as it is pulled, until
        every site answered or `timeout` passed: the consumer folds one reply before the
        next is pulled, so the coordinator never holds the round's replies together. Flower's
        `send_and_receive` returns them only once all are in, hence `push_messages` and
        `pull_messages` here. Bytes, failures and missing sites are recorded when the stream
        ends (or is closed)."""
        if not messages:
            return
        down = sum(record_bytes(m.content[ARRAYS]) for m in messages)
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + self.timeout
        up, answered, errors = 0, set[int](), dict[str, str]()
        wait = POLL_MIN
        try:
            while pending and time.monotonic() < deadline:
                got = False
                for reply in self.grid.pull_messages(pending):
                    got = True
                    pending.discard(reply.metadata.reply_to_message_id)
                    up += _up_bytes(reply)
                    if reply.has_error():
                        errors[reply.metadata.reply_to_message_id] = error_reason(
                            reply.error.reason
                        )
                        continue
                    answered.add(reply.metadata.src_node_id)
                    yield reply
                    del reply  # folded: the coordinator keeps nothing of it
                wait = POLL_MIN if got else min(2 * wait, POLL_MAX)
                if pending and not got:
                    time.sleep(min(wait, max(deadline - time.monotonic(), 0.0)))
        finally:
            self.book.add_bytes(server_round, up=up, down=down)
            self._record_missing(messages, answered, errors, phase, server_round)

    def _record_missing(
        self,
        messages: list[Message],
        answered: set[int],
        errors: dict[str, str],
        phase: str,
        server_round: int,
    ) -> None:
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


def _up_bytes(reply: Message) -> int:
    """What a reply's update weighs on the wire (an error reply carries none)."""
    if reply.has_error() or ARRAYS not in reply.content.array_records:
        return 0
    return record_bytes(reply.content[ARRAYS])
