"""The coordinator's signature on every instruction, checked by the site before it acts
(`fedllm.secure.instruction`): a message that is unsigned, forged, meant for another node,
run or phase, changed on the way, or whose registry does not hold this site's own key is
answered with a refusal naming what is wrong, and nothing is read or trained."""

from __future__ import annotations

import logging
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedllm.config import FedllmConfig
from fedllm.mods.context import SiteMod, partition
from fedllm.mods.sign import signing_key
from fedllm.secure.instruction import (
    Instruction,
    InstructionError,
    check_instruction,
    config_digest,
)
from fedllm.secure.registry import load_public_key, public_key_id, public_pem
from fedllm.wire import CONFIG, SERVER_ROUND, instruction_record, refusal_content

__all__ = ["InstructionMod", "coordinator_key"]

log = logging.getLogger("fedllm.client")


def coordinator_key(cfg: FedllmConfig, context: Context) -> Ed25519PublicKey | None:
    """The coordinator's public key this site checks instructions with: its node config's
    `coordinator-key` always (the coordinator cannot switch the check off), else, under
    `security.sign-updates`, the run config's `security.coordinator-public-key` (a
    simulation, where the sites share the coordinator's files); None: no check.

    Raises
    ------
    KeyFileError
        If the key file is missing or not an Ed25519 public key.
    """
    path = context.node_config.get("coordinator-key")
    if not path and not cfg.security.sign_updates:
        return None
    return load_public_key(Path(str(path or cfg.security.coordinator_public_key)))


class InstructionMod(SiteMod):
    """Client mod that checks the coordinator's signature on the request, inside `SignMod`
    (so a refusal is signed) and outside every other mod (nothing is read first)."""

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Check the instruction; refuse it, or run the rest of the app."""
        cfg = self.run_config(ctxt)
        key = coordinator_key(cfg, ctxt)
        if key is None:
            return call_next(msg, ctxt)
        site = partition(ctxt)[0]
        own = signing_key(cfg, ctxt, site)
        fields, digest = instruction_record(msg.content)
        phase = "evaluate" if msg.metadata.message_type == MessageType.EVALUATE else "train"
        expected = Instruction(
            run_id=msg.metadata.run_id,
            server_round=int(msg.content[CONFIG].get(SERVER_ROUND, 0)),
            node_id=ctxt.node_id,
            phase=phase,
            config_sha256=config_digest(ctxt.run_config),
            registry_sha256="",
            content_sha256=digest,
        )
        try:
            check_instruction(
                fields,
                key,
                expected,
                partition=site,
                own_key_id=public_key_id(public_pem(own)) if own is not None else None,
            )
        except InstructionError as e:
            reason = f"site {site} refuses the {phase} request: {e}"
            log.warning("%s", reason)
            return Message(content=refusal_content(site, reason), reply_to=msg)
        return call_next(msg, ctxt)
