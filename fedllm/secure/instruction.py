"""Instructions signed by the coordinator, checked by the site before it acts on them.

Every message the coordinator sends carries an `instruction` record: the run, the round,
the phase, the node it is for, a digest of the run config, a digest of the message's
content (the global adapter and its config), and the signed registry itself, all under one
Ed25519 signature with the coordinator's key:

    fedllm instruction v1 | run id | round | node id | phase | run-config SHA-256
        | registry SHA-256 | content SHA-256

A site holding the coordinator's public key (its node config `coordinator-key`) refuses,
before it reads any data, a message that is unsigned, signed by another key, meant for
another node, run or phase, whose content or run config changed after signing (a
compromised SuperLink), or whose registry does not verify or does not list this site's own
signing key at its partition (a coordinator that would accept another key as this site).

What this does not prove: that the coordinator's instructions are wise. The site's policy
(`fedllm.site_policy`) is what decides whether it accepts them. A replayed instruction makes
the site redo a round it already did; its spend is recorded again, never hidden.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedllm.errors import FedllmError, KeyFileError
from fedllm.secure.registry import Registry, parse_registry, public_key_id, public_pem
from fedllm.secure.sign import canonical_json

__all__ = [
    "Instruction",
    "InstructionError",
    "check_instruction",
    "config_digest",
    "instruction_fields",
]

_CONTEXT = b"fedllm instruction v1"


class InstructionError(FedllmError):
    """An instruction the site will not act on: unsigned, forged, or not meant for it."""


def config_digest(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of a run config (the flat keys `flwr run` submitted), exact and typed."""
    pairs = [[str(k), run_config[k]] for k in sorted(run_config)]
    return hashlib.sha256(canonical_json(pairs)).hexdigest()


@dataclass(frozen=True)
class Instruction:
    """What the coordinator's signature binds a message to."""

    run_id: int
    server_round: int
    node_id: int
    phase: str  # "train" or "evaluate"
    config_sha256: str
    registry_sha256: str
    content_sha256: str

    def statement(self) -> bytes:
        return b"|".join(
            [
                _CONTEXT,
                str(self.run_id).encode(),
                str(self.server_round).encode(),
                str(self.node_id).encode(),
                self.phase.encode(),
                self.config_sha256.encode(),
                self.registry_sha256.encode(),
                self.content_sha256.encode(),
            ]
        )


def instruction_fields(
    ins: Instruction, key: ed25519.Ed25519PrivateKey, registry: bytes
) -> dict[str, Any]:
    """The `instruction` record's fields (ids as strings: uint64 overflows an int field)."""
    return {
        "run-id": str(ins.run_id),
        "round": ins.server_round,
        "node-id": str(ins.node_id),
        "phase": ins.phase,
        "config-sha256": ins.config_sha256,
        "registry-sha256": ins.registry_sha256,
        "content-sha256": ins.content_sha256,
        "registry": registry,
        "key-id": public_key_id(public_pem(key)),
        "ed25519": key.sign(ins.statement()),
    }


def check_instruction(
    fields: Mapping[str, Any] | None,
    coordinator: ed25519.Ed25519PublicKey,
    expected: Instruction,
    *,
    partition: int,
    own_key_id: str | None,
) -> Registry:
    """Check an instruction record against what the site sees (`expected`: the message's
    run, round, node and phase, the digest of its content and of the site's run config).
    Returns the verified registry.

    Raises
    ------
    InstructionError
        Naming what is wrong: unsigned, forged, for another node, run, round or phase,
        content or run config changed, a registry that does not verify or lacks this site.
    """
    if fields is None:
        raise InstructionError(
            "the coordinator's message is unsigned (no instruction record); this site acts "
            "only on instructions signed by the coordinator's key"
        )
    try:
        claimed = Instruction(
            run_id=int(str(fields["run-id"])),
            server_round=int(fields["round"]),
            node_id=int(str(fields["node-id"])),
            phase=str(fields["phase"]),
            config_sha256=str(fields["config-sha256"]),
            registry_sha256=str(fields["registry-sha256"]),
            content_sha256=str(fields["content-sha256"]),
        )
        signature, registry = bytes(fields["ed25519"]), bytes(fields["registry"])
    except (KeyError, ValueError, TypeError) as e:
        raise InstructionError(f"malformed instruction record ({e})") from e
    try:
        coordinator.verify(signature, claimed.statement())
    except InvalidSignature:
        raise InstructionError(
            "the instruction's signature does not verify under the coordinator's key "
            f"{public_key_id(public_pem(coordinator))[:16]}… (forged, or its fields altered)"
        ) from None
    for what, got, want in (
        ("run", claimed.run_id, expected.run_id),
        ("node", claimed.node_id, expected.node_id),
        ("phase", claimed.phase, expected.phase),
        ("round", claimed.server_round, expected.server_round),
    ):
        if got != want:
            raise InstructionError(f"the instruction was signed for {what} {got}, not {want}")
    if claimed.content_sha256 != expected.content_sha256:
        raise InstructionError(
            "the message's content does not match what the coordinator signed (changed on the way)"
        )
    if claimed.config_sha256 != expected.config_sha256:
        raise InstructionError(
            "the run config this site was given does not match the one the coordinator "
            "signed (changed on the way)"
        )
    if hashlib.sha256(registry).hexdigest() != claimed.registry_sha256:
        raise InstructionError("the registry sent is not the one the instruction names")
    try:
        verified = parse_registry(registry, coordinator, what="the coordinator's registry")
    except KeyFileError as e:
        raise InstructionError(str(e).rstrip(".")) from e
    if own_key_id is not None:
        entry = verified.sites.get(partition)
        if entry is None or entry.key_id != own_key_id:
            held = f"key {entry.key_id[:16]}… as {entry.name!r}" if entry else "no key"
            raise InstructionError(
                f"the coordinator's registry holds {held} for partition {partition}, not this "
                f"site's signing key {own_key_id[:16]}…; it would accept another key as this site"
            )
    return verified
