"""The site sends its update as float16 or blockwise int8 (`strategy.update-encoding`).

Encoding is post-processing: it runs after every privacy mechanism has acted (DP-SGD's
noise in training, the distributed-DP noise share in `DistributedDPMod`) and reads nothing
but their output and the global adapter the coordinator sent, so it changes no privacy
guarantee. It runs before `SignMod`, so the signature covers the encoded bytes as they
travel. The coordinator's `fedllm.strategy.decode` stage adds the global back.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedllm.errors import ProtectionUnavailableError
from fedllm.mods.context import SiteMod, partition
from fedllm.wire import ARRAYS, encode_update, is_encrypted, record_bytes, record_to_arrays

__all__ = ["EncodeMod"]

log = logging.getLogger("fedllm.client")


class EncodeMod(SiteMod):
    """Client mod that replaces the trained adapter in a train reply by its encoded update
    (trained minus the global adapter received, `fedllm.wire.encode_update`).

    A pass-through under `strategy.update-encoding = "fp32"` (the default), and for a reply
    without `arrays` (a refusal) or carrying an error. Deterministic: the same adapter and
    global give the same bytes, so a replayed reply (`fedllm.site_replay`) is sent and
    signed identically.

    Notes
    -----
    Consider the order of mods when using multiple. `EncodeMod` sits on the train function,
    outside `DistributedDPMod` (before it in the list), so it encodes the noised update,
    and inside `SignMod`. The config refuses it under HE (ciphertexts are not quantised);
    handed ciphertexts, it fails loudly rather than encode their bytes.
    """

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        """Keep the global, run the app, encode its update."""
        s = self.config(msg, ctxt).strategy
        if s.update_encoding == "fp32":
            return call_next(msg, ctxt)
        site = partition(ctxt)[0]
        received = msg.content[ARRAYS]
        if is_encrypted(received):
            raise ProtectionUnavailableError(
                f"site {site}: strategy.update-encoding = {s.update_encoding!r} was handed "
                "ciphertexts; updates are encoded only without HE."
            )
        global_arrays = record_to_arrays(received)
        reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            return reply
        plain = record_bytes(reply.content[ARRAYS])
        encode_update(
            reply.content, global_arrays, scheme=s.update_encoding, block=s.quantization_block
        )
        sent = record_bytes(reply.content[ARRAYS])
        log.info(
            "site %d: update sent %s, %d bytes (%.0f%% of fp32)",
            site,
            s.update_encoding,
            sent,
            100 * sent / max(plain, 1),
        )
        return reply
