"""Update signatures: what verifies, and each way a reply is refused (with its reason)."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import Array, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedllm.errors import InvalidUpdateError
from fedllm.secure.registry import RegisteredSite
from fedllm.secure.sign import SIGNATURE_RECORD, Claim, content_digest
from fedllm.wire import arrays_to_record, sign_reply, verify_reply

CLAIM = Claim(run_id=2**63 + 5, server_round=2, node_id=2**64 - 3, phase="train")


def _site(key: ed25519.Ed25519PrivateKey, name: str = "site-1") -> RegisteredSite:
    return RegisteredSite(name, 1, key.public_key(), "ab" * 32)


def _content() -> RecordDict:
    rng = np.random.default_rng(0)
    arrays = {"b.0": rng.normal(size=(4, 8)).astype(np.float32), "b.1": np.zeros(3, np.float32)}
    return RecordDict(
        {
            "arrays": arrays_to_record(arrays),
            "metrics": MetricRecord({"num-examples": 640, "site": 1, "epsilon": 1.25}),
            "he": ConfigRecord({"key-id": "k", "blob": b"\x00\x01"}),
        }
    )


@pytest.fixture
def key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def test_a_signed_reply_verifies_and_returns_its_digest(key: ed25519.Ed25519PrivateKey) -> None:
    content = sign_reply(_content(), key, CLAIM)
    assert verify_reply(content, _site(key), CLAIM, sender="s") == content_digest(content)


def test_the_signature_survives_flowers_wire_format(key: ed25519.Ed25519PrivateKey) -> None:
    """What the coordinator receives is what Flower deserialised: the digest must match."""
    content = sign_reply(_content(), key, CLAIM)
    wire = recorddict_to_proto(content).SerializeToString()
    received = recorddict_from_proto(type(recorddict_to_proto(content)).FromString(wire))
    verify_reply(received, _site(key), CLAIM, sender="s")


def test_the_digest_ignores_the_signature_but_covers_everything_else() -> None:
    base = _content()
    d0 = content_digest(base)
    base[SIGNATURE_RECORD] = ConfigRecord({"x": 1})
    assert content_digest(base) == d0
    for mutate in (
        lambda c: c["metrics"].__setitem__("num-examples", 641),  # its FedAvg weight
        lambda c: c["metrics"].__setitem__("epsilon", 1.2500000001),  # its privacy claim
        lambda c: c["he"].__setitem__("blob", b"\x00\x02"),
        lambda c: c["arrays"].__setitem__("b.1", Array.from_numpy_ndarray(np.ones(3, np.float32))),
        lambda c: c.__setitem__("extra", MetricRecord({"a": 1})),
    ):
        changed = _content()
        mutate(changed)
        assert content_digest(changed) != d0


def test_an_unsigned_reply_is_refused(key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(InvalidUpdateError, match="site 1: unsigned update"):
        verify_reply(_content(), _site(key), CLAIM, sender="site 1")


def test_a_tensor_changed_after_signing_is_refused_as_tampered(
    key: ed25519.Ed25519PrivateKey,
) -> None:
    content = sign_reply(_content(), key, CLAIM)
    tampered = content["arrays"]["b.0"].numpy().copy()
    tampered[0, 0] += 1e-3
    content["arrays"]["b.0"] = Array.from_numpy_ndarray(tampered)
    with pytest.raises(InvalidUpdateError, match="payload does not match its signature"):
        verify_reply(content, _site(key), CLAIM, sender="s")


def test_a_signature_by_another_sites_key_is_refused(key: ed25519.Ed25519PrivateKey) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    content = sign_reply(_content(), other, CLAIM)
    with pytest.raises(InvalidUpdateError, match="does not verify under site-1's registered key"):
        verify_reply(content, _site(key), CLAIM, sender="s")


def test_rewriting_the_signed_round_breaks_the_signature(key: ed25519.Ed25519PrivateKey) -> None:
    old = Claim(CLAIM.run_id, 1, CLAIM.node_id, "train")
    content = sign_reply(_content(), key, old)
    content[SIGNATURE_RECORD]["round"] = 2  # an attacker relabels a round-1 update
    with pytest.raises(InvalidUpdateError, match="does not verify"):
        verify_reply(content, _site(key), CLAIM, sender="s")


@pytest.mark.parametrize(
    ("signed", "reason"),
    [
        (Claim(CLAIM.run_id, 1, CLAIM.node_id, "train"), "signed for train round 1, this is"),
        (Claim(CLAIM.run_id, 2, CLAIM.node_id, "evaluate"), "signed for evaluate round 2"),
        (Claim(7, 2, CLAIM.node_id, "train"), "signed for run 7"),
        (Claim(CLAIM.run_id, 2, 99, "train"), "signed for node 99 but sent by node"),
    ],
)
def test_a_genuine_reply_replayed_elsewhere_is_refused(
    key: ed25519.Ed25519PrivateKey, signed: Claim, reason: str
) -> None:
    content = sign_reply(_content(), key, signed)
    with pytest.raises(InvalidUpdateError, match=reason):
        verify_reply(content, _site(key), CLAIM, sender="s")


def test_a_malformed_signature_record_is_refused(key: ed25519.Ed25519PrivateKey) -> None:
    content = sign_reply(_content(), key, CLAIM)
    del content[SIGNATURE_RECORD]["ed25519"]
    with pytest.raises(InvalidUpdateError, match="malformed signature record"):
        verify_reply(content, _site(key), CLAIM, sender="s")
