"""A site acts only on instructions the coordinator signed, for this node, run, round and
phase, with the content and run config it was given, under a registry that verifies and
lists this site's own key (issue 16). Real Ed25519 keys and a real signed registry."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from flwr.app import ConfigRecord, Message, RecordDict

from fedllm import wire
from fedllm.mods.instruction import InstructionMod
from fedllm.secure.instruction import (
    Instruction,
    InstructionError,
    check_instruction,
    config_digest,
    instruction_fields,
)
from fedllm.secure.registry import (
    enrol,
    make_enrolment,
    new_registry,
    public_key_id,
    public_pem,
    signed_registry_bytes,
)
from fedllm.secure.site_keys import node_auth_pair, pem_private
from tests.test_mods import NODE_ID, RUN_ID, _config, _context, _message, _replying

RUN_CONFIG = {"run.name": "r", "security.sign-updates": True}


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Any]:
    """A coordinator, its signed registry with one site (partition 0), and that site."""
    coordinator = ed25519.Ed25519PrivateKey.generate()
    site = ed25519.Ed25519PrivateKey.generate()
    registry = tmp_path / "registry.json"
    registry.write_bytes(signed_registry_bytes(new_registry(coordinator, "0" * 64)))
    enrol(registry, make_enrolment("site-0", site, node_auth_pair()[1]), coordinator)
    (tmp_path / "coordinator.pub").write_bytes(public_pem(coordinator))
    (tmp_path / "signing.key").write_bytes(pem_private(site))
    (tmp_path / "signing.key").chmod(0o600)
    return {
        "coordinator": coordinator,
        "site": site,
        "registry": registry.read_bytes(),
        "pub": tmp_path / "coordinator.pub",
        "signing": tmp_path / "signing.key",
    }


def _expected(content: RecordDict, **changes: Any) -> Instruction:
    base = Instruction(
        run_id=RUN_ID,
        server_round=3,
        node_id=NODE_ID,
        phase="train",
        config_sha256=config_digest(RUN_CONFIG),
        registry_sha256="",
        content_sha256=wire.content_digest(content),
    )
    return replace(base, **changes)


def _signed(keys: dict[str, Any], content: RecordDict, **changes: Any) -> dict[str, Any]:
    """The instruction record the coordinator would attach, with `changes` to what it says."""
    ins = _expected(content, registry_sha256=hashlib.sha256(keys["registry"]).hexdigest())
    return instruction_fields(replace(ins, **changes), keys["coordinator"], keys["registry"])


def _check(keys: dict[str, Any], fields: dict[str, Any] | None, content: RecordDict) -> None:
    check_instruction(
        fields,
        keys["coordinator"].public_key(),
        _expected(content),
        partition=0,
        own_key_id=public_key_id(public_pem(keys["site"])),
    )


def _content() -> RecordDict:
    return RecordDict({wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 3})})


def test_a_signed_instruction_for_this_site_passes(keys: dict[str, Any]) -> None:
    content = _content()
    _check(keys, _signed(keys, content), content)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"node_id": NODE_ID + 1}, "signed for node"),
        ({"run_id": RUN_ID + 1}, "signed for run"),
        ({"server_round": 2}, "signed for round 2, not 3"),
        ({"phase": "evaluate"}, "signed for phase evaluate, not train"),
        ({"content_sha256": "0" * 64}, "content does not match what the coordinator signed"),
        ({"config_sha256": "0" * 64}, "run config this site was given does not match"),
        ({"registry_sha256": "0" * 64}, "registry sent is not the one the instruction names"),
    ],
)
def test_an_instruction_meant_for_something_else_is_refused_naming_it(
    keys: dict[str, Any], changes: dict[str, Any], named: str
) -> None:
    content = _content()
    with pytest.raises(InstructionError, match=named):
        _check(keys, _signed(keys, content, **changes), content)


def test_an_unsigned_or_forged_instruction_is_refused(keys: dict[str, Any]) -> None:
    content = _content()
    with pytest.raises(InstructionError, match="unsigned"):
        _check(keys, None, content)
    forged = _signed({**keys, "coordinator": ed25519.Ed25519PrivateKey.generate()}, content)
    with pytest.raises(InstructionError, match="does not verify under the coordinator's key"):
        _check(keys, forged, content)
    altered = {**_signed(keys, content), "round": 4}  # a field changed after signing
    with pytest.raises(InstructionError, match="does not verify"):
        _check(keys, altered, content)


def test_a_registry_with_a_bad_coordinator_signature_is_refused(keys: dict[str, Any]) -> None:
    body = json.loads(keys["registry"])
    body["created"] = "edited"  # any change breaks the coordinator's signature on it
    edited = signed_registry_bytes(body)
    content = _content()
    with pytest.raises(
        InstructionError, match="the coordinator's registry: its signature does not verify"
    ):
        _check(keys, _signed({**keys, "registry": edited}, content), content)


def test_a_registry_that_gives_this_partition_another_key_is_refused(
    keys: dict[str, Any], tmp_path: Path
) -> None:
    """A coordinator that would accept another key as this site: the registry verifies,
    but partition 0 holds someone else's key."""
    other = tmp_path / "other.json"
    other.write_bytes(signed_registry_bytes(new_registry(keys["coordinator"], "0" * 64)))
    impostor = ed25519.Ed25519PrivateKey.generate()
    enrol(other, make_enrolment("site-0", impostor, node_auth_pair()[1]), keys["coordinator"])
    content = _content()
    with pytest.raises(InstructionError, match="would accept another key as this site"):
        _check(keys, _signed({**keys, "registry": other.read_bytes()}, content), content)


def test_the_instruction_mod_refuses_a_forged_message_before_the_app_runs(
    keys: dict[str, Any],
) -> None:
    content = _config()  # SERVER_ROUND = 3, as tests.test_mods sends
    forged = _signed({**keys, "coordinator": ed25519.Ed25519PrivateKey.generate()}, content)
    signed = RecordDict(dict(content.items()))
    signed[wire.INSTRUCTION_RECORD] = ConfigRecord(forged)
    calls: list[Message] = []
    context = _context(
        RUN_CONFIG, **{"coordinator-key": str(keys["pub"]), "signing-key": str(keys["signing"])}
    )
    reply = InstructionMod()(_message(signed), context, _replying(lambda m: RecordDict(), calls))
    assert calls == []
    assert "does not verify under the coordinator's key" in str(wire.refusal_reason(reply.content))


def test_the_instruction_mod_passes_a_genuine_message(keys: dict[str, Any]) -> None:
    content = _config()
    context = _context(
        RUN_CONFIG, **{"coordinator-key": str(keys["pub"]), "signing-key": str(keys["signing"])}
    )
    # the digest the site computes covers everything but the instruction record itself
    fields = _signed(keys, content, config_sha256=config_digest(context.run_config))
    signed = RecordDict(dict(content.items()))
    signed[wire.INSTRUCTION_RECORD] = ConfigRecord(fields)
    calls: list[Message] = []
    InstructionMod()(_message(signed), context, _replying(lambda m: RecordDict(), calls))
    assert len(calls) == 1
