"""The site signs every reply it sends (train, refusal, evaluate) with its Ed25519 key.

Under `security.sign-updates` the signature covers the run, the round, this node, the phase
and a digest of the whole payload (`fedllm.wire.sign_reply`), so the coordinator can prove
which site sent an update and that nothing changed it on the way.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedllm.config import FedllmConfig
from fedllm.mods.context import SiteMod, partition
from fedllm.secure.pki import load_signing_key
from fedllm.secure.sign import Claim
from fedllm.wire import CONFIG, SERVER_ROUND, sign_reply

__all__ = ["SignMod", "signing_key"]


def signing_key(cfg: FedllmConfig, context: Context, site: int) -> Ed25519PrivateKey | None:
    """The site's signing key: its node config's `signing-key` always (the coordinator
    cannot switch a site's signatures off), else under `security.sign-updates` the run
    config's per-partition `security.site-signing-key`; None when replies go unsigned.

    Raises
    ------
    KeyFileError
        If the key file is missing or readable by others.
    """
    path = context.node_config.get("signing-key")
    if not path and not cfg.security.sign_updates:
        return None
    path = path or cfg.security.site_signing_key.format(partition=site)
    return load_signing_key(Path(str(path)))


class SignMod(SiteMod):
    """Client mod that signs the reply, last, when `security.sign-updates` is on.

    It loads the key before it calls the rest of the app, so a missing or world-readable
    key stops the site before it trains, spends privacy or appends to its ledger. The
    phase it signs is the message's category (`train`, `evaluate`).

    Notes
    -----
    Consider the order of mods when using multiple. `SignMod` must be the first (outermost)
    mod: it must see the reply exactly as it leaves, after every mod that changes it
    (`HEMod` encrypts, `DistributedDPMod` noises), since nothing may change after signing.
    """

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Load the key, run the rest of the app, sign its reply."""
        key = signing_key(self.run_config(ctxt), ctxt, partition(ctxt)[0])
        reply = call_next(msg, ctxt)
        if key is None or reply.has_error():
            return reply
        server_round = int(msg.content[CONFIG].get(SERVER_ROUND, 0))
        phase = msg.metadata.message_type.partition(".")[0]
        sign_reply(
            reply.content, key, Claim(msg.metadata.run_id, server_round, ctxt.node_id, phase)
        )
        return reply
