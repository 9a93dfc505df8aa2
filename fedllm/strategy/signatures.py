"""Signatures, both ways (`security.sign-updates`): every message the coordinator sends is
signed with its key (an instruction record the sites check before acting), and every reply
is checked against its site's registered Ed25519 key before anything in it is used. The
`security` section of the summary (which sites' signatures verified each round, and the
at-rest key id) is this stage's."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedllm.errors import UNREADABLE_REPLY, InvalidUpdateError
from fedllm.secure.instruction import Instruction
from fedllm.secure.pki import load_signing_key
from fedllm.secure.registry import RegisteredSite, Registry, load_registry
from fedllm.secure.sign import Claim
from fedllm.strategy.base import RunContext, Stage
from fedllm.wire import content_digest, reply_site, sign_instruction, verify_reply

__all__ = ["Signatures"]


class Signatures(Stage):
    """Drops (and records) every reply that is unsigned, tampered, signed by another key or
    replayed; with signing off it only names the node each site answers from."""

    name = "signatures"
    state_keys = ("security",)
    summary_keys = ("security",)

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        sec = self.cfg.security
        # Loaded now, so a missing key or a bad registry stops the run before anything
        # happens; the registry must verify under the coordinator's own key.
        self.key = (
            load_signing_key(Path(sec.coordinator_key), "the coordinator's signing key")
            if sec.sign_updates
            else None
        )
        self.signed_registry: Registry | None = (
            load_registry(Path(sec.registry), self.key.public_key()) if self.key else None
        )
        self.registry: dict[int, RegisteredSite] | None = (
            self.signed_registry.sites if self.signed_registry else None
        )
        ctx.coordinator_key = self.key
        ctx.registry_sha256 = self.signed_registry.sha256 if self.signed_registry else ""

    def begin(self) -> None:
        sec, key = self.cfg.security, self.ctx.at_rest
        self.state["security"] = {
            **self.state.get("security", {}),
            "at_rest": {"cipher": "AES-256-GCM", "key_id": key.id} if key else None,
            "sign_updates": sec.sign_updates,
            "registry": sec.registry if self.registry else None,
            "registry_sha256": self.signed_registry.sha256 if self.signed_registry else None,
            "coordinator_key_id": (
                self.signed_registry.coordinator_key_id if self.signed_registry else None
            ),
            "site_keys": {
                str(k): {"name": r.name, "key_id": r.key_id}
                for k, r in sorted((self.registry or {}).items())
            },
        }

    def summary_section(self) -> dict[str, Any]:
        return {"security": self.state.get("security")}

    def accept(self, reply: Message, server_round: int, phase: str) -> int:
        """The site a reply comes from, once its signature checks out; raises
        `InvalidUpdateError` (or KeyError/ValueError for a malformed reply) otherwise."""
        site = reply_site(reply.content)
        node = reply.metadata.src_node_id
        sender = f"site {site} (node {node})"
        if self.registry is not None:
            registered = self.registry.get(site)
            if registered is None:
                raise InvalidUpdateError(
                    f"{sender}: no signing key for partition {site} in "
                    f"{self.cfg.security.registry}; enrol the site with `fedllm pki enrol`."
                )
            claim = Claim(self.ctx.run_id, server_round, node, phase)
            t0 = time.perf_counter()
            verify_reply(reply.content, registered, claim, sender=sender)
            security = self.state.setdefault("security", {})
            seconds = security.setdefault("verify_seconds", {})
            seconds[str(server_round)] = seconds.get(str(server_round), 0.0) + (
                time.perf_counter() - t0
            )
            verified = security.setdefault("verified", {})
            verified.setdefault(str(server_round), {}).setdefault(phase, []).append(site)
        self.ctx.book.seen(node, site)
        return site

    def _accepted(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> Iterator[Message]:
        """The replies whose signature checks out, one at a time (a streaming round folds
        each before the next is pulled)."""
        for reply in replies:
            try:
                self.accept(reply, server_round, phase)
            except UNREADABLE_REPLY as e:
                self.ctx.book.reject(server_round, reply, phase, e)
                continue
            yield reply

    def _signed(self, server_round: int, messages: Iterable[Message], phase: str) -> list[Message]:
        """Every outgoing message with the coordinator's instruction record, signed last."""
        out = list(messages)
        if self.key is None or self.signed_registry is None:
            return out
        registry = self.signed_registry
        digests: dict[int, str] = {}  # the messages share one content: hash it once
        for msg in out:
            digest = digests.setdefault(id(msg.content), content_digest(msg.content))
            ins = Instruction(
                run_id=self.ctx.run_id,
                server_round=server_round,
                node_id=msg.metadata.dst_node_id,
                phase=phase,
                config_sha256=self.ctx.config_sha256,
                registry_sha256=registry.sha256,
                content_sha256=digest,
            )
            msg.content = sign_instruction(msg.content, self.key, ins, registry.raw)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        return self._signed(server_round, messages, "train")

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(server_round, arrays, config, grid)
        return self._signed(server_round, messages, "evaluate")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(
            server_round, self._accepted(server_round, replies, "train")
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(
            server_round, self._accepted(server_round, replies, "evaluate")
        )
