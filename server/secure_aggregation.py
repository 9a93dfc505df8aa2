"""The coordinator's side of homomorphic aggregation: it sums ciphertexts it cannot read.

Holds the public CKKS context (refused at start if it carries a secret key), the encrypted
global adapter (Σ w_k x_k and the public total weight D), and checks each site's
contribution whole before adding it. Flower's strategies average plaintext arrays, so the
sum is ours; everything else of the round (sampling, messaging, checkpoints) is the run's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedllm.config import FedllmConfig
from fedllm.errors import InvalidUpdateError
from fedllm.secure.at_rest import AtRestKey
from fedllm.secure.he import EncryptedSum, key_id, load_public_context
from fedllm.secure.he_checkpoint import (
    EncryptedAdapter,
    load_encrypted_adapter,
    save_encrypted_adapter,
)
from fedllm.secure.packing import Packing
from fedllm.wire import arrays_to_record, ciphertexts_to_record, record_to_ciphertexts

__all__ = ["HEAggregator"]


class HEAggregator:
    """Encrypted global state and per-round sums for one run."""

    def __init__(self, cfg: FedllmConfig, shapes: dict[str, tuple[int, ...]]) -> None:
        self.cfg = cfg
        self.ctx = load_public_context(Path(cfg.he.public_context), cfg.he.params)
        self.key = key_id(self.ctx)
        self.packing = Packing.for_arrays(shapes, cfg.he.params.slots)
        self.global_blobs: list[bytes] | None = None  # None: the public initial adapter
        self.divisor = 1.0

    # -- what goes out ---------------------------------------------------------------------
    def payload(self, initial: dict[str, np.ndarray]) -> ArrayRecord:
        """The encrypted global adapter; before round 1 the initial adapter, which every
        party derives from the shared seed anyway (B = 0), travels as it is."""
        if self.global_blobs is None:
            return arrays_to_record(initial)
        return ciphertexts_to_record(self.global_blobs)

    def config(self, num_sites: int, weight_unit: float) -> dict[str, Any]:
        return {
            "he-key-id": self.key,
            "he-divisor": float(self.divisor),
            "he-sites": num_sites,
            "he-weight-unit": float(weight_unit),
        }

    # -- a round ---------------------------------------------------------------------------
    def new_sum(self) -> EncryptedSum:
        return EncryptedSum(self.ctx, self.key, self.packing.chunk_sizes)

    @staticmethod
    def add(
        total: EncryptedSum, reply: Message, *, sender: str, site: int, expected_weight: float
    ) -> None:
        """Check one reply's contribution whole and add it, or raise `InvalidUpdateError`.

        The weight a site encrypted into its check slots must be the public one it is due
        (its examples over the unit, or 1/n): one claiming more would tilt the mean."""
        content = reply.content
        if "he" not in content.config_records:
            raise InvalidUpdateError(f"{sender}: sent no HE key id; plaintext is not accepted.")
        blobs = record_to_ciphertexts(content["arrays"])
        weight = float(content["metrics"].get("he-weight", float("nan")))
        if not math.isclose(weight, expected_weight, rel_tol=1e-9):
            raise InvalidUpdateError(
                f"{sender}: claims weight {weight!r}, but its share is {expected_weight!r}."
            )
        he = content["he"]
        total.add(
            blobs,
            weight=weight,
            key=str(he.get("key-id", "")),
            digest=str(he.get("sha256", "")),
            sender=sender,
            site=site,
        )

    def commit(self, total: EncryptedSum) -> None:
        self.global_blobs = total.blobs()
        self.divisor = total.weight

    def ciphertext_bytes(self) -> int:
        return int(sum(len(b) for b in self.global_blobs or []))

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, directory: Path, *, at_rest: AtRestKey | None = None) -> None:
        adapter = EncryptedAdapter(
            blobs=list(self.global_blobs or []),
            divisor=self.divisor,
            key=self.key,
            packing=self.packing,
        )
        save_encrypted_adapter(directory, adapter, model=self.cfg.model.name, at_rest=at_rest)

    def resume(self, directory: Path, *, at_rest: AtRestKey | None = None) -> None:
        adapter = load_encrypted_adapter(directory, at_rest=at_rest)
        if adapter.key != self.key:
            raise InvalidUpdateError(
                f"checkpoint {directory} was encrypted under key {adapter.key[:12]}..., not "
                f"this run's {self.key[:12]}...; resume with the original public.context."
            )
        if adapter.packing != self.packing:
            raise InvalidUpdateError(f"checkpoint {directory} has another adapter layout.")
        self.global_blobs, self.divisor = adapter.blobs, adapter.divisor
