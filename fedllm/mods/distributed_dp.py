"""Distributed DP under HE: the site clips its own update and adds its share of the noise.

Under homomorphic aggregation the coordinator cannot clip or noise the sum, so with
user-level DP each of the n sites sends global + clip(Δ, S) + N(0, σ²S²/n)
(`fedllm.privacy.distributed`); the encrypted sum carries the noise of one central step.
"""

from __future__ import annotations

import logging
import time

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedllm.errors import ProtectionUnavailableError
from fedllm.mods.context import SiteMod, partition
from fedllm.privacy.distributed import noisy_clipped_contribution
from fedllm.privacy.userdp import secure_rng
from fedllm.wire import (
    ARRAYS,
    CONFIG,
    HE_SECONDS,
    HE_SITES,
    METRICS,
    arrays_to_record,
    is_encrypted,
    record_to_arrays,
)

__all__ = ["DistributedDPMod"]

log = logging.getLogger("fedllm.client")


class DistributedDPMod(SiteMod):
    """Client mod that turns a trained adapter into the site's distributed-DP contribution.

    Active only under HE with user-level DP (`strategy.secure-aggregation = "he"`,
    `privacy.mode` with user-level DP); otherwise the coordinator clips and noises and this
    mod passes everything through. It keeps the (plaintext) global adapter it receives,
    replaces the reply's `arrays` with global + clip(trained − global, `privacy.user-clip`)
    + its 1/n share of the Gaussian noise (n = the coordinator's `he-sites`), and reports
    the seconds this took under `he-seconds` (the HE mod adds its own). The update's norm
    is logged, never sent. A reply without `arrays` (a refusal) leaves unchanged.

    Notes
    -----
    Consider the order of mods when using multiple. `DistributedDPMod` must sit inside
    `HEMod` (after it in the list), on the train function only: it needs the global adapter
    already decrypted and must hand plaintext to encryption. It refuses ciphertexts, so a
    wrong order fails loudly instead of noising ciphertext bytes.
    """

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Keep the global, run the app, clip and noise its update."""
        cfg = self.config(msg, ctxt)
        if cfg.strategy.secure_aggregation != "he" or not cfg.privacy.user_level:
            return call_next(msg, ctxt)
        site = partition(ctxt)[0]
        global_arrays = record_to_arrays(_plaintext(msg.content[ARRAYS], site))
        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        t0 = time.perf_counter()
        values, norm = noisy_clipped_contribution(
            global_arrays,
            record_to_arrays(_plaintext(reply.content[ARRAYS], site)),
            clip_norm=cfg.privacy.user_clip,
            noise_multiplier=cfg.privacy.user_noise_multiplier,
            num_sites=int(msg.content[CONFIG][HE_SITES]),
            rng=secure_rng(),
        )
        log.info(
            "site %d: update norm %.4g clipped to %g, noise share added",
            site,
            norm,
            cfg.privacy.user_clip,
        )
        reply.content[ARRAYS] = arrays_to_record(values)
        reply.content[METRICS][HE_SECONDS] = time.perf_counter() - t0
        return reply


def _plaintext(record: ArrayRecord, site: int) -> ArrayRecord:
    """`record`, refused if it holds ciphertexts (the mods are in the wrong order)."""
    if is_encrypted(record):
        raise ProtectionUnavailableError(
            f"site {site}: the distributed-DP mod was handed ciphertexts; it must sit inside "
            "the HE mod (after it in the list of mods)."
        )
    return record
