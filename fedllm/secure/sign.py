"""Update signatures: a site signs what it sends, the coordinator checks it before use.

A site signs, with its Ed25519 key, the statement

    fedllm update signature v1 | run id | round | node id | phase | SHA-256 of the reply

and attaches it as a `signature` ConfigRecord. The coordinator recomputes the digest of
what arrived and checks the signature against the site's key in the registry
(`fedllm pki init`). That proves which site sent an update, and refuses:

- a payload changed after signing (tampered): the digest no longer matches;
- a signature by any other key: it does not verify under the registered one;
- a replay: a genuine reply from an earlier round (or run, or node) is signed for that
  round, and the statement names it.

TLS already protects the wire; the signature is end to end (it survives a compromised
SuperLink or a proxy that terminates TLS) and is what the run's records can prove.
Written by hand: Flower 1.41 signs FABs, not messages. The primitives are `cryptography`'s.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedllm.errors import InvalidUpdateError
from fedllm.secure.registry import RegisteredSite

__all__ = [
    "INSTRUCTION_RECORD",
    "SIGNATURE_RECORD",
    "Claim",
    "check_signature",
    "canonical_json",
    "content_digest",
    "statement",
]

SIGNATURE_RECORD = "signature"
INSTRUCTION_RECORD = "instruction"  # the coordinator's signature on what it sends
_UNSIGNED = (SIGNATURE_RECORD, INSTRUCTION_RECORD)  # the records a content digest leaves out
_CONTEXT = b"fedllm update signature v1"


def _frame(h: Any, *parts: bytes) -> None:
    # Length-prefixed, so no two different contents hash alike by shifting a boundary.
    for part in parts:
        h.update(struct.pack(">Q", len(part)))
        h.update(part)


def canonical_json(value: Any) -> bytes:
    """Metric/config values as exact, typed JSON (bytes as hex; floats by repr)."""

    def enc(v: Any) -> Any:
        if isinstance(v, bool):
            return {"b": v}
        if isinstance(v, int):
            return {"i": str(v)}
        if isinstance(v, float):
            return {"f": repr(v)}
        if isinstance(v, bytes):
            return {"x": v.hex()}
        if isinstance(v, str):
            return {"s": v}
        if isinstance(v, list):
            return [enc(x) for x in v]
        raise TypeError(f"cannot sign a value of type {type(v).__name__}")

    return json.dumps(enc(value), sort_keys=True, separators=(",", ":")).encode()


def content_digest(content: Any) -> str:
    """SHA-256 over every record of a message except its signatures: tensors (names, dtype,
    shape, bytes), metrics and configs, in a canonical order. `content` is a Flower
    `RecordDict`, read only through its attributes, so this module needs no Flower import."""
    h = hashlib.sha256()
    for name in sorted(content.array_records):
        _frame(h, b"arrays", name.encode())
        for key, arr in sorted(content.array_records[name].items()):
            shape = ",".join(str(d) for d in arr.shape).encode()
            _frame(h, key.encode(), arr.dtype.encode(), shape, arr.stype.encode(), arr.data)
    for kind, records in (("metrics", content.metric_records), ("configs", content.config_records)):
        for name in sorted(records):
            if kind == "configs" and name in _UNSIGNED:
                continue
            _frame(h, kind.encode(), name.encode())
            for key, value in sorted(records[name].items()):
                _frame(h, key.encode(), canonical_json(value))
    return h.hexdigest()


@dataclass(frozen=True)
class Claim:
    """What a signature binds an update to."""

    run_id: int
    server_round: int
    node_id: int
    phase: str  # "train" or "evaluate"


def statement(claim: Claim, digest: str) -> bytes:
    return b"|".join(
        [
            _CONTEXT,
            str(claim.run_id).encode(),
            str(claim.server_round).encode(),
            str(claim.node_id).encode(),
            claim.phase.encode(),
            digest.encode(),
        ]
    )


def check_signature(
    fields: Any, actual_digest: str, site: RegisteredSite, expected: Claim, *, sender: str
) -> str:
    """Check the fields of a reply's signature record (a mapping: run-id, round, node-id,
    phase, sha256, ed25519) against the digest of what arrived, `site`'s registered key and
    `expected` (this run, this round, the node it came from). Returns the verified digest.

    Raises
    ------
    InvalidUpdateError
        Naming `sender` and why: tampered, wrong key, replayed, or malformed.
    """
    try:
        claimed = Claim(
            run_id=int(str(fields["run-id"])),
            server_round=int(fields["round"]),
            node_id=int(str(fields["node-id"])),
            phase=str(fields["phase"]),
        )
        signed_digest, signature = str(fields["sha256"]), bytes(fields["ed25519"])
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidUpdateError(f"{sender}: malformed signature record ({e}).") from e
    if actual_digest != signed_digest:
        raise InvalidUpdateError(
            f"{sender}: payload does not match its signature (SHA-256 {actual_digest[:16]}… "
            f"arrived, {signed_digest[:16]}… was signed): tampered with after signing."
        )
    try:
        site.public_key.verify(signature, statement(claimed, signed_digest))
    except InvalidSignature:
        raise InvalidUpdateError(
            f"{sender}: signature does not verify under {site.name}'s registered key "
            f"{site.key_id[:16]}… (signed by another key, or its fields were altered)."
        ) from None
    if claimed.run_id != expected.run_id:
        raise InvalidUpdateError(
            f"{sender}: replayed update: signed for run {claimed.run_id}, this is run "
            f"{expected.run_id}."
        )
    if (claimed.server_round, claimed.phase) != (expected.server_round, expected.phase):
        raise InvalidUpdateError(
            f"{sender}: replayed update: signed for {claimed.phase} round "
            f"{claimed.server_round}, this is {expected.phase} round {expected.server_round}."
        )
    if claimed.node_id != expected.node_id:
        raise InvalidUpdateError(
            f"{sender}: update signed for node {claimed.node_id} but sent by node "
            f"{expected.node_id} (replayed through another node)."
        )
    return actual_digest
