"""What travels between the coordinator and a site: every message key, and the one place
adapters, ciphertexts, spends and signatures become Flower records and back (both apps,
the stages and the mods use it; nothing else in `fedllm/` touches Flower records)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedllm.errors import InvalidUpdateError
from fedllm.privacy.accounting import MECHANISMS
from fedllm.secure.pki import RegisteredSite
from fedllm.secure.sign import SIGNATURE_RECORD, Claim, check_signature, content_digest, statement

__all__ = [
    "ARRAYS",
    "CKKS_STYPE",
    "CONFIG",
    "HE",
    "METRICS",
    "REFUSAL",
    "arrays_to_record",
    "ciphertexts_to_record",
    "is_encrypted",
    "record_bytes",
    "record_to_arrays",
    "record_to_ciphertexts",
    "reply_site",
    "route_fedllm_logs",
    "sign_reply",
    "spend_metrics",
    "verify_reply",
]

# -- record names inside a message's RecordDict ------------------------------------------------
ARRAYS = "arrays"  # the adapter (ArrayRecord): plaintext tensors or CKKS ciphertexts
CONFIG = "config"  # coordinator -> site instructions (ConfigRecord)
METRICS = "metrics"  # site -> coordinator figures (MetricRecord)
REFUSAL = "refusal"  # a site's refusal: ConfigRecord {"reason": ...}
HE = "he"  # an encrypted reply's key id and payload digest: ConfigRecord

# -- coordinator -> site config keys ------------------------------------------------------------
RUN_NAME = "run-name"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
HE_KEY_ID = "he-key-id"
HE_DIVISOR = "he-divisor"
HE_SITES = "he-sites"
HE_WEIGHT_UNIT = "he-weight-unit"

# -- site -> coordinator metric keys ------------------------------------------------------------
SITE = "site"
NUM_EXAMPLES = "num-examples"
REFUSED = "refused"
TRAIN_EXAMPLES = "train-examples"  # evaluate replies: the site's training examples
HE_WEIGHT = "he-weight"
HE_SECONDS = "he-seconds"
SAFETY_DROPPED = "safety-dropped"
# the round's DP-SGD spend (record-level), read into the run ledger by the coordinator
SPEND_KEYS = ("noise-multiplier", "sample-rate", "steps", "max-grad-norm", "delta")

# Ciphertexts travel as opaque byte arrays in an ArrayRecord, so Flower streams them in
# chunks like any tensor (a ConfigRecord of bytes would travel as one message).
CKKS_STYPE = "tenseal.ckks_vector"


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((name, Array.from_numpy_ndarray(np.asarray(a))) for name, a in arrays.items())
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return OrderedDict((name, arr.numpy()) for name, arr in record.items())


def ciphertexts_to_record(blobs: list[bytes]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict(
            (f"ckks-{i:05d}", Array(dtype="uint8", shape=(len(b),), stype=CKKS_STYPE, data=b))
            for i, b in enumerate(blobs)
        )
    )


def is_encrypted(record: ArrayRecord) -> bool:
    return any(arr.stype == CKKS_STYPE for arr in record.values())


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    """The serialized CKKS vectors in order; any plaintext tensor among them is refused."""
    names = list(record)
    if names != [f"ckks-{i:05d}" for i in range(len(names))]:
        raise InvalidUpdateError("encrypted record has missing or misnamed ciphertexts.")
    if any(arr.stype != CKKS_STYPE for arr in record.values()):
        raise InvalidUpdateError("encrypted record mixes plaintext tensors with ciphertexts.")
    return [bytes(arr.data) for arr in record.values()]


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors a record carries (what travels on the wire, minus framing)."""
    return int(sum(len(arr.data) for arr in record.values()))


def reply_site(content: RecordDict) -> int:
    """The partition id a reply claims to come from (checked by the signature stage)."""
    return int(content[METRICS][SITE])


def spend_metrics(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    """A training reply's record-level DP-SGD spend as typed values for the run ledger, or
    None when the reply reports none (no record-level DP at that site)."""
    if "epsilon-prv" not in metrics:
        return None
    return {
        "site": int(metrics[SITE]),
        "noise_multiplier": metrics["noise-multiplier"],
        "sample_rate": metrics["sample-rate"],
        "steps": int(metrics["steps"]),
        "max_grad_norm": metrics["max-grad-norm"],
        "delta": metrics["delta"],
        "epsilons": {m: metrics[f"epsilon-{m}"] for m in MECHANISMS},
    }


def sign_reply(content: RecordDict, key: ed25519.Ed25519PrivateKey, claim: Claim) -> RecordDict:
    """Attach a `signature` record to a reply (done last: nothing may change after)."""
    digest = content_digest(content)
    content[SIGNATURE_RECORD] = ConfigRecord(
        {
            "run-id": str(claim.run_id),  # uint64 node/run ids overflow a signed int field
            "round": claim.server_round,
            "node-id": str(claim.node_id),
            "phase": claim.phase,
            "sha256": digest,
            "ed25519": key.sign(statement(claim, digest)),
        }
    )
    return content


def verify_reply(content: RecordDict, site: RegisteredSite, expected: Claim, *, sender: str) -> str:
    """Check a reply's signature against `site`'s registered key and `expected` (this run,
    this round, the node it came from). Returns the verified digest.

    Raises
    ------
    InvalidUpdateError
        Naming `sender` and why: unsigned, tampered, wrong key, or replayed.
    """
    if SIGNATURE_RECORD not in content.config_records:
        raise InvalidUpdateError(
            f"{sender}: unsigned update; security.sign-updates requires every site to sign "
            "with its key from `fedllm pki init`."
        )
    fields = content.config_records[SIGNATURE_RECORD]
    return check_signature(fields, content_digest(content), site, expected, sender=sender)


def route_fedllm_logs() -> None:
    """Show fedllm's INFO logs through Flower's handlers (`flwr log`, `--stream`, Ray actors)."""
    flwr_logger = logging.getLogger("flwr")
    ours = logging.getLogger("fedllm")
    ours.setLevel(logging.INFO)
    for handler in flwr_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False
