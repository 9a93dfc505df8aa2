"""The one place adapters become Flower records and back (both apps use it)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = ["arrays_to_record", "record_bytes", "record_to_arrays", "route_fedllm_logs"]


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(
        OrderedDict((name, Array.from_numpy_ndarray(np.asarray(a))) for name, a in arrays.items())
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return OrderedDict((name, arr.numpy()) for name, arr in record.items())


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
