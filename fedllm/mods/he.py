"""Homomorphic aggregation at the site: open the encrypted global, seal what it sends.

The site holds the CKKS secret context (`fedllm.secure.he_site.SiteHE`); the coordinator
only ever sees ciphertexts. A run config and a coordinator that disagree about HE are
refused, never turned into a silent plaintext round.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedllm.config import FedllmConfig
from fedllm.errors import ProtectionUnavailableError
from fedllm.mods.context import SiteMod, partition
from fedllm.secure.he import payload_digest
from fedllm.secure.he_site import SiteHE
from fedllm.secure.packing import share_weight
from fedllm.wire import (
    ARRAYS,
    CONFIG,
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
    NUM_EXAMPLES,
    SERVER_ROUND,
    arrays_to_record,
    ciphertexts_to_record,
    is_encrypted,
    record_to_arrays,
    record_to_ciphertexts,
)

__all__ = ["HEMod", "site_he"]


def site_he(cfg: FedllmConfig, msg: Message, context: Context, site: int) -> SiteHE | None:
    """The site's HE state when the run aggregates under HE, else None.

    Raises
    ------
    ProtectionUnavailableError
        If the run config and the coordinator's message disagree about HE.
    """
    asked = cfg.strategy.secure_aggregation == "he"
    if asked != (HE_KEY_ID in msg.content[CONFIG]):
        raise ProtectionUnavailableError(
            f"site {site}: the run config says strategy.secure-aggregation = "
            f"{cfg.strategy.secure_aggregation!r} but the coordinator "
            f"{'did not send' if asked else 'sent'} HE parameters; refusing the round."
        )
    if not asked:
        return None
    path = str(context.node_config.get("he-context", cfg.he.site_context))
    return SiteHE.load(cfg, path, site=site)


class HEMod(SiteMod):
    """Client mod for homomorphic aggregation (`strategy.secure-aggregation = "he"`).

    On the way in it decrypts (and integrity-checks) the encrypted global adapter and puts
    the plaintext in the message's `arrays` record, so the mods inside it and the app see
    plaintext. On the way out it encrypts the reply's `arrays` weighted by the site's public
    share (`share_weight`: examples / the federation's examples, or 1/n under user-level
    DP), adds the `he` record (key id, payload digest) and the `he-weight` and `he-seconds`
    metrics. `he-seconds` is what HE costs the site per round: decrypting, sealing, and the
    clipping and noising a `DistributedDPMod` inside reports under the same metric. A reply
    without `arrays` (a refusal, an evaluation) leaves unchanged. Without HE it only checks
    that the coordinator agrees.

    Notes
    -----
    Consider the order of mods when using multiple. `HEMod` must sit inside `SignMod` (the
    signature covers the ciphertexts) and outside every mod that reads or changes the
    plaintext adapter (`DistributedDPMod`): it should be the last to operate on params.
    """

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Open the global, run the rest of the app, seal its adapter."""
        cfg = self.config(msg, ctxt)
        he = site_he(cfg, msg, ctxt, partition(ctxt)[0])
        if he is None:
            return call_next(msg, ctxt)
        t0 = time.perf_counter()
        config = msg.content[CONFIG]
        if is_encrypted(msg.content[ARRAYS]):
            plain = he.open_global(
                record_to_ciphertexts(msg.content[ARRAYS]),
                divisor=float(config[HE_DIVISOR]),
                server_key=str(config[HE_KEY_ID]),
                # the global is the sum of at most one bounded update a round
                max_norm=cfg.validate.max_update_norm * max(1, int(config[SERVER_ROUND])),
            )
            msg.content[ARRAYS] = arrays_to_record(plain)
        opened_seconds = time.perf_counter() - t0
        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        t0 = time.perf_counter()
        content, metrics = reply.content, reply.content[METRICS]
        num_sites = int(config[HE_SITES])
        weight = share_weight(
            user_level=cfg.privacy.user_level,
            num_examples=int(metrics[NUM_EXAMPLES]),
            unit=float(config.get(HE_WEIGHT_UNIT, 1.0)),
            num_sites=num_sites,
        )
        blobs = he.seal(record_to_arrays(content[ARRAYS]), weight=weight, num_sites=num_sites)
        content[ARRAYS] = ciphertexts_to_record(blobs)
        content[HE] = ConfigRecord(
            {HE_RECORD_KEY_ID: he.key, HE_RECORD_SHA256: payload_digest(blobs)}
        )
        inner_seconds = float(metrics.pop(HE_SECONDS, 0.0))  # re-added below, after he-weight
        metrics[HE_WEIGHT] = weight
        metrics[HE_SECONDS] = opened_seconds + inner_seconds + time.perf_counter() - t0
        return reply
