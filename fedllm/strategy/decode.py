"""Decode: a site's encoded update (`strategy.update-encoding` fp16 or int8) is turned back
into the float32 adapter before any stage uses it. It sits after the signature check (the
signature covers the encoded bytes, as they travelled) and after the spends (which read only
the figures: a site whose update is rejected here still had its spend recorded), and before
validation, so every check and rule further in sees a plain adapter, exactly as in an fp32
run. A site must send exactly the run's encoding: a plain reply in an encoded run, an
encoded one in an fp32 run, another block size or a malformed layout is rejected with one
line naming the site, like any invalid update."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fedllm.errors import UNREADABLE_REPLY, InvalidUpdateError
from fedllm.strategy.base import Stage
from fedllm.wire import ARRAYS, decode_update, decoded_reply, refusal_reason, reply_site

__all__ = ["Decode"]


class Decode(Stage):
    """Decode every encoded update; reject (and record) one that is not the run's encoding.

    Active in every run, fp32 included: there it passes plain replies on untouched and
    rejects encoded ones.
    """

    name = "decode"
    summary_keys = ("update_encoding",)

    def summary_section(self) -> dict[str, Any]:
        s = self.cfg.strategy
        section: dict[str, Any] = {"encoding": s.update_encoding}
        if s.update_encoding == "int8":
            section["block"] = s.quantization_block
            section["scales"] = "float32 absmax per block"
        if s.update_encoding != "fp32":
            section["encodes"] = "the update: each site's adapter minus the round's global adapter"
        return {"update_encoding": section}

    def plan(self) -> str | None:
        s = self.cfg.strategy
        if s.update_encoding == "fp32":
            return None
        block = f", blocks of {s.quantization_block}" if s.update_encoding == "int8" else ""
        return f"(updates {s.update_encoding}{block})"

    def decoded(
        self, server_round: int, reply: Message, reference: dict[str, Any]
    ) -> Message | None:
        """`reply` with its update decoded against `reference` (the round's global adapter),
        itself if plain (fp32 run) or carrying no update (a refusal), or None once rejected
        and recorded."""
        s = self.cfg.strategy
        try:
            if refusal_reason(reply.content) is not None or ARRAYS not in reply.content:
                return reply
            sender = f"site {reply_site(reply.content)} (node {reply.metadata.src_node_id})"
            try:
                arrays = decode_update(
                    reply.content,
                    reference,
                    scheme=s.update_encoding,
                    block=s.quantization_block,
                )
            except InvalidUpdateError as e:
                raise InvalidUpdateError(f"{sender}: {e}") from e
        except UNREADABLE_REPLY as e:
            self.ctx.book.reject(server_round, reply, "train", e)
            return None
        return reply if arrays is None else decoded_reply(reply, arrays)

    def _decoded_all(self, server_round: int, replies: Iterable[Message]) -> Iterator[Message]:
        # the global adapter this round's requests carried: what each update is relative to
        reference = {n: self.ctx.arrays[n] for n in self.ctx.expected}
        for reply in replies:
            out = self.decoded(server_round, reply, reference)
            if out is not None:
                yield out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # lazily: replies may arrive as a stream, and are decoded one at a time
        return self.inner.aggregate_train(server_round, self._decoded_all(server_round, replies))
