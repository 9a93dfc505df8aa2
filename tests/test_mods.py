"""The site's client mods (`fedllm.mods`) around a stand-in handler: no model is trained.

Real keys, real CKKS contexts and Flower's own mod mechanism (`ClientApp(mods=...)`,
`@app.train(mods=...)`); only the handler inside is a fake, so every order guarantee can
be checked without training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp

from fedllm import wire
from fedllm.config import parse_config
from fedllm.errors import KeyFileError, ProtectionUnavailableError
from fedllm.model import adapter_spec
from fedllm.mods import (
    DistributedDPMod,
    EncodeMod,
    HEMod,
    InstructionMod,
    PolicyMod,
    SignMod,
    reply_mods,
    train_mods,
)
from fedllm.secure.he import SECRET_CONTEXT, payload_digest
from fedllm.secure.he_site import SiteHE
from fedllm.secure.sign import SIGNATURE_RECORD, Claim, content_digest, statement

RUN_ID, NODE_ID, ROUND = 11, 7, 3
Handler = Callable[[Message, Context], Message]


@pytest.fixture()
def signing_key_file(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "signing.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path, 0o600)
    return path, key


def _message(content: RecordDict, kind: str = MessageType.TRAIN) -> Message:
    """An instruction as the coordinator sends it (no SuperLink needed)."""
    metadata = Metadata(
        run_id=RUN_ID,
        message_id="m-1",
        src_node_id=0,
        dst_node_id=NODE_ID,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=metadata)


def _context(run_config: dict[str, Any], **node: Any) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=NODE_ID,
        node_config={"partition-id": 0, "num-partitions": 2, **node},
        state=RecordDict(),
        run_config=run_config,
    )


def _config(**extra: Any) -> RecordDict:
    return RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: ROUND, **extra})})


def _replying(content: Callable[[Message], RecordDict], calls: list[Message]) -> Handler:
    def handler(msg: Message, context: Context) -> Message:
        calls.append(msg)
        return Message(content=content(msg), reply_to=msg)

    return handler


def _app(overrides: dict[str, Any], handler: Handler) -> ClientApp:
    """The mods exactly as clients/app.py registers them, around `handler`."""
    app = ClientApp(mods=reply_mods(overrides))
    app.train(mods=train_mods(overrides))(handler)
    app.evaluate()(handler)
    return app


def test_the_mods_are_listed_in_the_documented_order() -> None:
    """Signing outermost, the site's policy inside it (its refusals are signed, and come
    before anything is decrypted), HE inside that, distributed DP on the train function only."""
    # Execute
    around_every, around_train = reply_mods({}), train_mods({})
    # Assert
    assert [type(m) for m in around_every] == [SignMod, InstructionMod, PolicyMod, HEMod]
    assert [type(m) for m in around_train] == [EncodeMod, DistributedDPMod]


def test_the_sign_mod_refuses_a_missing_key_before_the_app_runs(tmp_path: Path) -> None:
    """A missing signing key stops the site before it trains or spends any privacy."""
    # Prepare
    calls: list[Message] = []
    handler = _replying(lambda msg: RecordDict(), calls)
    run_config = {
        "security.sign-updates": True,
        "security.site-signing-key": str(tmp_path / "site-{partition}.key"),
    }
    # Execute / Assert
    with pytest.raises(KeyFileError, match="no file at"):
        SignMod()(_message(_config()), _context(run_config), handler)
    assert calls == []


def test_the_sign_mod_signs_the_reply_over_run_round_node_and_phase(
    signing_key_file: tuple[Path, Ed25519PrivateKey],
) -> None:
    """The signature binds this run, round, node and the message's category."""
    # Prepare
    path, key = signing_key_file
    metrics = {wire.SITE: 0, wire.NUM_EXAMPLES: 4}
    handler = _replying(lambda msg: RecordDict({wire.METRICS: MetricRecord(metrics)}), [])
    context = _context({"security.sign-updates": True}, **{"signing-key": str(path)})
    # Execute
    reply = SignMod()(_message(_config(), MessageType.EVALUATE), context, handler)
    # Assert
    fields = reply.content.config_records[SIGNATURE_RECORD]
    digest = content_digest(reply.content)
    assert fields["sha256"] == digest and fields["phase"] == "evaluate"
    claim = Claim(RUN_ID, ROUND, NODE_ID, "evaluate")
    key.public_key().verify(bytes(fields["ed25519"]), statement(claim, digest))


def test_the_sign_mod_leaves_replies_unsigned_when_signing_is_off() -> None:
    # Prepare
    handler = _replying(lambda msg: RecordDict({wire.METRICS: MetricRecord({wire.SITE: 0})}), [])
    # Execute
    reply = SignMod()(_message(_config()), _context({}), handler)
    # Assert
    assert SIGNATURE_RECORD not in reply.content.config_records


@pytest.mark.parametrize(
    ("run_config", "sent", "match"),
    [
        ({}, {wire.HE_KEY_ID: "k"}, "'none' but the coordinator sent HE parameters"),
        ({"strategy.secure-aggregation": "he"}, {}, "'he' but the coordinator did not send"),
    ],
)
def test_the_he_mod_refuses_a_coordinator_that_disagrees_before_the_app_runs(
    run_config: dict[str, Any], sent: dict[str, Any], match: str
) -> None:
    """A mismatch about HE is refused, never turned into a silent plaintext round."""
    # Prepare
    calls: list[Message] = []
    handler = _replying(lambda msg: RecordDict(), calls)
    # Execute / Assert
    with pytest.raises(ProtectionUnavailableError, match=match):
        HEMod()(_message(_config(**sent)), _context(run_config), handler)
    assert calls == []


def test_the_distributed_dp_mod_passes_through_without_he() -> None:
    # Prepare
    trained = {"b": np.full((2, 2), 5.0, np.float32)}
    content = {wire.ARRAYS: wire.arrays_to_record(trained), wire.METRICS: MetricRecord({})}
    handler = _replying(lambda msg: RecordDict(content), [])
    msg = _message(RecordDict({**_config(), wire.ARRAYS: wire.arrays_to_record(trained)}))
    # Execute
    reply = DistributedDPMod()(msg, _context({"privacy.mode": "user"}), handler)
    # Assert
    np.testing.assert_array_equal(wire.record_to_arrays(reply.content[wire.ARRAYS])["b"], 5.0)
    assert wire.HE_SECONDS not in reply.content[wire.METRICS]


def test_the_distributed_dp_mod_refuses_ciphertexts() -> None:
    """Outside the HE mod it would be handed ciphertexts: it fails instead of noising them."""
    # Prepare
    run_config = {"strategy.secure-aggregation": "he", "privacy.mode": "user"}
    msg = _message(RecordDict({**_config(), wire.ARRAYS: wire.ciphertexts_to_record([b"x"])}))
    # Execute / Assert
    with pytest.raises(ProtectionUnavailableError, match="inside the HE mod"):
        DistributedDPMod()(msg, _context(run_config), _replying(lambda msg: RecordDict(), []))


def _he_run(tiny_model_dir: Path, he_keys: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model.name": str(tiny_model_dir),
        "strategy.secure-aggregation": "he",
        "he.site-context": str(he_keys / SECRET_CONTEXT),
        **extra,
    }


def _encrypted_global(run_config: dict[str, Any], value: float, **config: Any) -> Message:
    """A train instruction carrying an encrypted global adapter of `value` everywhere."""
    cfg = parse_config(run_config)
    he = SiteHE.load(cfg, cfg.he.site_context, site=0)
    spec = adapter_spec(cfg.model, cfg.lora)
    plain = {n: np.full(spec.shapes[n], value) for n in spec.sent}
    blobs = he.seal(plain, weight=0.5, num_sites=1)  # the sum of weights the divisor undoes
    extra = {wire.HE_KEY_ID: he.key, wire.HE_DIVISOR: 0.5, wire.HE_SITES: 2, **config}
    content = RecordDict({**_config(**extra), wire.ARRAYS: wire.ciphertexts_to_record(blobs)})
    return _message(content)


def test_the_he_mod_opens_the_global_and_seals_the_reply(
    tiny_model_dir: Path, he_keys: Path
) -> None:
    """The handler sees the plaintext global; the reply leaves weighted, encrypted, with the
    key id, payload digest, `he-weight` and `he-seconds`, and decrypts to the trained values."""
    # Prepare
    run_config = _he_run(tiny_model_dir, he_keys)
    msg = _encrypted_global(run_config, 0.25, **{wire.HE_WEIGHT_UNIT: 20.0})
    seen: list[Message] = []

    def trained(msg: Message) -> RecordDict:
        arrays = {n: a + 0.5 for n, a in wire.record_to_arrays(msg.content[wire.ARRAYS]).items()}
        metrics = MetricRecord({wire.SITE: 0, wire.NUM_EXAMPLES: 5})
        return RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.METRICS: metrics})

    # Execute
    reply = HEMod()(msg, _context(run_config), _replying(trained, seen))
    # Assert
    opened = wire.record_to_arrays(seen[0].content[wire.ARRAYS])
    assert all(np.allclose(a, 0.25, atol=1e-6) for a in opened.values())
    blobs = wire.record_to_ciphertexts(reply.content[wire.ARRAYS])
    he_record = reply.content.config_records[wire.HE]
    he = SiteHE.load(parse_config(run_config), str(he_keys / SECRET_CONTEXT), site=0)
    assert dict(he_record) == {wire.HE_RECORD_KEY_ID: he.key, "sha256": payload_digest(blobs)}
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.HE_WEIGHT] == pytest.approx(5 / 20) and metrics[wire.HE_SECONDS] > 0
    back = he.open_global(blobs, divisor=5 / 20, server_key=he.key)
    assert all(np.allclose(a, 0.75, atol=1e-5) for a in back.values())


def test_the_he_mod_leaves_a_refusal_unencrypted(tiny_model_dir: Path, he_keys: Path) -> None:
    # Prepare
    run_config = _he_run(tiny_model_dir, he_keys)
    refusal = wire.refusal_content(0, "budget spent")
    # Execute
    reply = HEMod()(
        _encrypted_global(run_config, 0.0), _context(run_config), _replying(lambda msg: refusal, [])
    )
    # Assert
    assert reply.content[wire.METRICS][wire.REFUSED] == 1
    assert wire.HE not in reply.content.config_records
    assert wire.ARRAYS not in reply.content.array_records


def _distributed_dp_update(
    tiny_model_dir: Path,
    he_keys: Path,
    *,
    clip: float,
    sigma: float,
    node: dict[str, Any] | None = None,
    **extra: Any,
) -> tuple[Message, np.ndarray]:
    """A site's reply through the mods exactly as registered, under HE with user-level DP, to
    a global of 0.1 everywhere after a stand-in training step of +3; and what the reply
    decrypts to, less the global (flattened)."""
    run_config = _he_run(
        tiny_model_dir,
        he_keys,
        **{
            "privacy.mode": "user",
            "privacy.user-clip": clip,
            "privacy.user-noise-multiplier": sigma,
            **extra,
        },
    )

    def trained(msg: Message) -> RecordDict:
        arrays = {n: a + 3.0 for n, a in wire.record_to_arrays(msg.content[wire.ARRAYS]).items()}
        metrics = MetricRecord({wire.SITE: 0, wire.NUM_EXAMPLES: 5})
        return RecordDict({wire.ARRAYS: wire.arrays_to_record(arrays), wire.METRICS: metrics})

    app = _app({}, _replying(trained, []))
    reply = app(_encrypted_global(run_config, 0.1), _context(run_config, **(node or {})))
    he = SiteHE.load(parse_config(run_config), str(he_keys / SECRET_CONTEXT), site=0)
    back = he.open_global(
        wire.record_to_ciphertexts(reply.content[wire.ARRAYS]), divisor=0.5, server_key=he.key
    )
    return reply, np.concatenate([(a - 0.1).ravel() for a in back.values()])


def test_the_mods_in_order_send_a_signed_clipped_noised_encrypted_update(
    tiny_model_dir: Path, he_keys: Path, signing_key_file: tuple[Path, Ed25519PrivateKey]
) -> None:
    """Through Flower's own mod chain: the signature covers the ciphertexts, which decrypt
    to global + clip(trained − global, S) + a small noise share, weighted 1/n."""
    # Prepare
    path, key = signing_key_file
    clip = 0.5
    # Execute
    reply, delta = _distributed_dp_update(
        tiny_model_dir,
        he_keys,
        clip=clip,
        sigma=1e-6,
        node={"signing-key": str(path)},  # a key in the node config: the site always signs
    )
    # Assert
    fields = reply.content.config_records[SIGNATURE_RECORD]
    digest = content_digest(reply.content)
    key.public_key().verify(
        bytes(fields["ed25519"]), statement(Claim(RUN_ID, ROUND, NODE_ID, "train"), digest)
    )
    assert reply.content[wire.METRICS][wire.HE_WEIGHT] == pytest.approx(0.5)  # 1/n, n = 2
    assert np.linalg.norm(delta) == pytest.approx(clip, rel=1e-3)
    assert np.allclose(delta, delta[0], atol=1e-4)  # the same direction as the update


def test_the_sealed_update_carries_the_sites_noise_share(
    tiny_model_dir: Path, he_keys: Path
) -> None:
    """What the coordinator receives, decrypted, is global + clip(Δ, S) + the site's share of
    the central noise: per coordinate Gaussian with standard deviation σ·S/√n (n = 2 here),
    so the encrypted sum of n shares carries one central step's noise."""
    # Prepare
    clip, sigma, sites = 0.5, 1.0, 2
    # Execute
    _, sent = _distributed_dp_update(tiny_model_dir, he_keys, clip=clip, sigma=sigma)
    # Assert
    clipped = np.full(sent.size, clip / np.sqrt(sent.size))  # Δ = 3 everywhere, clipped to S
    noise = sent - clipped
    assert sent.size >= 500  # enough coordinates to estimate the spread to ~3%
    assert float(noise.std()) == pytest.approx(sigma * clip / np.sqrt(sites), rel=0.1)
    assert abs(float(noise.mean())) < 5 * sigma * clip / np.sqrt(sites * sent.size)
