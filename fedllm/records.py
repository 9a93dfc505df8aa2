"""The one place adapters become Flower records and back (both apps use it)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "CKKS_STYPE",
    "arrays_to_record",
    "ciphertexts_to_record",
    "is_encrypted",
    "record_bytes",
    "record_to_arrays",
    "record_to_ciphertexts",
    "route_fedllm_logs",
]

# Ciphertexts travel as opaque byte arrays in an ArrayRecord, so Flower streams them in
# chunks like any tensor (a ConfigRecord of bytes would travel as one message).
CKKS_STYPE = "tenseal.ckks_vector"


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((name, Array.from_numpy_ndarray(np.asarray(a))) for name, a in arrays.items())
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return OrderedDict((name, arr.numpy()) for name, arr in record.items())


def ciphertexts_to_record(blobs: list[bytes]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict(
            (f"ckks-{i:05d}", Array(dtype="uint8", shape=(len(b),), stype=CKKS_STYPE, data=b))
            for i, b in enumerate(blobs)
        )
    )


def is_encrypted(record: ArrayRecord) -> bool:
    return any(arr.stype == CKKS_STYPE for arr in record.values())


def record_to_ciphertexts(record: ArrayRecord) -> list[bytes]:
    """The serialized CKKS vectors in order; any plaintext tensor among them is refused."""
    from fedllm.errors import InvalidUpdateError

    names = list(record)
    if names != [f"ckks-{i:05d}" for i in range(len(names))]:
        raise InvalidUpdateError("encrypted record has missing or misnamed ciphertexts.")
    if any(arr.stype != CKKS_STYPE for arr in record.values()):
        raise InvalidUpdateError("encrypted record mixes plaintext tensors with ciphertexts.")
    return [bytes(arr.data) for arr in record.values()]


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the tensors a record carries (what travels on the wire, minus framing)."""
    return int(sum(len(arr.data) for arr in record.values()))


def route_fedllm_logs() -> None:
    """Show fedllm's INFO logs through Flower's handlers (`flwr log`, `--stream`, Ray actors)."""
    import logging

    flwr_logger = logging.getLogger("flwr")
    ours = logging.getLogger("fedllm")
    ours.setLevel(logging.INFO)
    for handler in flwr_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False
