"""The HE sum: under `strategy.secure-aggregation = "he"` the coordinator sums CKKS
ciphertexts it cannot read (`fedllm.secure.he`), holding only the public context (a
context with the secret key is refused at start).

Flower's strategies average plaintext arrays, so under HE the sum is this stage's and it
ends the chain: the inner strategy only picks the sites. Each contribution is checked whole
and added when the validate stage asks (`add_reply`, the run's update check under HE), so
run.min-sites counts only contributions that really entered the sum; the sum becomes the
encrypted global adapter (Σ w_k x_k and the public total weight D) when the round is
committed, after distributed-DP accounting. Checkpoints hold only ciphertexts.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm.errors import InvalidUpdateError
from fedllm.secure.he import EncryptedSum, key_id, load_public_context
from fedllm.secure.he_checkpoint import (
    EncryptedAdapter,
    load_encrypted_adapter,
    save_encrypted_adapter,
)
from fedllm.secure.packing import Packing, share_weight
from fedllm.strategy.base import RoundDiscarded, RunContext, Stage
from fedllm.wire import (
    ARRAYS,
    HE,
    HE_DIVISOR,
    HE_KEY_ID,
    HE_RECORD_KEY_ID,
    HE_RECORD_SHA256,
    HE_SECONDS,
    HE_SITES,
    HE_WEIGHT,
    HE_WEIGHT_UNIT,
    METRICS,
    arrays_to_record,
    ciphertexts_to_record,
    record_to_ciphertexts,
    reply_site,
)

__all__ = ["HESum"]


class HESum(Stage):
    """Encrypted global state and per-round sums for one run."""

    name = "he-sum"
    state_keys = ("secure_aggregation",)
    summary_keys = ("secure_aggregation",)

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return cfg.strategy.secure_aggregation == "he"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        if not self.active:
            return
        he = self.cfg.he
        # Loaded (and a secret-key context refused) before anything else happens.
        self.ctx_he = load_public_context(Path(he.public_context), he.params)
        self.key = key_id(self.ctx_he)
        self.packing = Packing.for_arrays(dict(ctx.expected), he.params.slots)
        self.global_blobs: list[bytes] | None = None  # None: the public initial adapter
        self.divisor = 1.0
        self._sum: EncryptedSum | None = None
        self._unit = 1.0
        self._seconds = 0.0  # the coordinator's cost of checking and adding ciphertexts
        ctx.update_check = self.add_reply

    def plan(self) -> str:
        return f"over CKKS ciphertexts (key {self.key[:12]})"

    def begin(self) -> None:
        he = self.cfg.he
        self.state.setdefault("secure_aggregation", {"rounds": []}).update(
            scheme="CKKS (TenSEAL), the coordinator holds only the public context",
            key_id=self.key,
            poly_modulus_degree=he.poly_modulus_degree,
            coeff_mod_bit_sizes=he.coeff_mod_bit_sizes,
            scale_bits=he.scale_bits,
            ciphertexts_per_update=len(self.packing.chunk_sizes),
        )

    def summary_section(self) -> dict[str, Any]:
        return {"secure_aggregation": self.state.get("secure_aggregation")}

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.state.setdefault("secure_aggregation", {"rounds": []})["rounds"]

    # -- what goes out ---------------------------------------------------------------------
    def weight_unit(self) -> float:
        """The federation's training examples as the sites reported them before round 1:
        HE weights are examples / unit, public and summing to about 1, and fixed before any
        round, so no reply can move another site's weight."""
        return self.ctx.book.fixed_train_examples() or 1.0

    def payload(self) -> ArrayRecord:
        """The encrypted global adapter; before round 1 the initial adapter, which every
        party derives from the shared seed anyway (B = 0), travels as it is."""
        if self.global_blobs is None:
            return arrays_to_record(self.ctx.arrays)
        return ciphertexts_to_record(self.global_blobs)

    def _config(self, config: ConfigRecord) -> ConfigRecord:
        return ConfigRecord(
            {
                **config,
                HE_KEY_ID: self.key,
                HE_DIVISOR: float(self.divisor),
                HE_SITES: self.ctx.num_sites,
                HE_WEIGHT_UNIT: float(self.weight_unit()),
            }
        )

    def open_round(self) -> None:
        """Start the round's sum (and its unit); `add_reply` adds to it."""
        self._sum = EncryptedSum(self.ctx_he, self.key, self.packing.chunk_sizes)
        self._seconds = 0.0
        self._unit = self.weight_unit()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.open_round()
        return self.inner.configure_train(server_round, self.payload(), self._config(config), grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(
            server_round, self.payload(), self._config(config), grid
        )

    # -- a round ---------------------------------------------------------------------------
    def add_reply(self, reply: Message, sender: str) -> None:
        """Check one reply's contribution whole and add it to the round's sum, or raise
        `InvalidUpdateError`. The weight a site encrypted into its check slots must be the
        public one it is due (its examples over the unit, or 1/n): one claiming more would
        tilt the mean."""
        if self._sum is None:
            raise InvalidUpdateError(f"{sender}: no HE round is open.")
        content = reply.content
        metrics = content[METRICS]
        if HE not in content.config_records:
            raise InvalidUpdateError(f"{sender}: sent no HE key id; plaintext is not accepted.")
        t0 = time.perf_counter()
        blobs = record_to_ciphertexts(content[ARRAYS])
        weight = float(metrics.get(HE_WEIGHT, float("nan")))
        site = reply_site(content)
        own = self.ctx.book.own_count(site)
        if own is None and not self.cfg.privacy.user_level:
            raise InvalidUpdateError(
                f"{sender}: reported no training examples before round 1, so it has no "
                "public HE weight."
            )
        expected = share_weight(
            user_level=self.cfg.privacy.user_level,
            num_examples=own or 0,
            unit=self._unit,
            num_sites=self.ctx.num_sites,
        )
        if not math.isclose(weight, expected, rel_tol=1e-9):
            raise InvalidUpdateError(
                f"{sender}: claims weight {weight!r}, but its share is {expected!r}."
            )
        he = content[HE]
        self._sum.add(
            blobs,
            weight=weight,
            key=str(he.get(HE_RECORD_KEY_ID, "")),
            digest=str(he.get(HE_RECORD_SHA256, "")),
            sender=sender,
            site=site,
        )
        self._seconds += time.perf_counter() - t0

    def _entry(self, server_round: int) -> dict[str, Any]:
        assert self._sum is not None
        return {
            "round": server_round,
            "contributors": sorted(self._sum.contributors),
            "total_weight": self._sum.weight,
            "server_seconds": round(self._seconds, 4),
            "site_seconds": {
                site: round(float(m[HE_SECONDS]), 4)
                for site, m in self.ctx.book.round("trains", server_round).items()
                if HE_SECONDS in m
            },
        }

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Make the round's encrypted sum the global adapter (the coordinator never reads
        it); the inner strategy is not asked to average ciphertexts. Each reply's ciphertexts
        join the sum as the validate stage checks it, so the replies are only run through
        here, one at a time (none is kept)."""
        assert self._sum is not None
        deque(replies, maxlen=0)
        entry = self._entry(server_round)
        z = self.ctx.notes.get("noise_multiplier")
        if z is not None:
            entry["noise_multiplier"] = z
        t0 = time.perf_counter()
        self.global_blobs = self._sum.blobs()
        self.divisor = self._sum.weight
        entry["server_seconds"] = round(self._seconds + time.perf_counter() - t0, 4)
        entry["ciphertext_bytes"] = int(sum(len(b) for b in self.global_blobs))
        self.rounds.append(entry)
        log(
            INFO,
            "fedllm: [round %d] summed %d encrypted updates (%d ciphertexts each, %.1f MB) "
            "without decrypting; total weight %g",
            server_round,
            len(self._sum.contributors),
            len(self.packing.chunk_sizes),
            entry["ciphertext_bytes"] / 1e6,
            self._sum.weight,
        )
        return ciphertexts_to_record(self.global_blobs), None

    def round_discarded(self, server_round: int, discarded: RoundDiscarded) -> None:
        """The sum is discarded unread; the global adapter stays as it was."""
        if self._sum is not None:
            self.rounds.append({**self._entry(server_round), "aborted": discarded.reason})

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> bool:
        """The server never holds the global adapter in plaintext: only its ciphertexts."""
        adapter = EncryptedAdapter(
            blobs=list(self.global_blobs or []),
            divisor=self.divisor,
            key=self.key,
            packing=self.packing,
        )
        save_encrypted_adapter(path, adapter, model=self.cfg.model.name, at_rest=self.ctx.at_rest)
        return True

    def load_checkpoint(self, path: Path) -> bool:
        adapter = load_encrypted_adapter(path, at_rest=self.ctx.at_rest)
        if adapter.key != self.key:
            raise InvalidUpdateError(
                f"checkpoint {path} was encrypted under key {adapter.key[:12]}..., not "
                f"this run's {self.key[:12]}...; resume with the original public.context."
            )
        if adapter.packing != self.packing:
            raise InvalidUpdateError(f"checkpoint {path} has another adapter layout.")
        self.global_blobs, self.divisor = adapter.blobs, adapter.divisor
        return True
