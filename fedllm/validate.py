"""Checks on an incoming adapter update before it may touch the aggregate (pure)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedllm.errors import InvalidUpdateError

__all__ = ["WIRE_DTYPE", "check_update"]

# Every party sends adapter tensors as float32 (fedllm.model casts bf16/fp16 training
# weights before they leave): any other dtype is refused rather than cast, since a float64
# 1e300 is finite and only becomes inf in the aggregate.
WIRE_DTYPE = np.dtype(np.float32)


def check_update(
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    *,
    sender: str,
    reference: Mapping[str, np.ndarray] | None = None,
    max_norm: float = math.inf,
) -> None:
    """Refuse an update whose names, shapes, dtype or values are not a valid adapter, or
    whose L2 distance from `reference` (the global adapter the site was sent) exceeds
    `max_norm`.

    Raises
    ------
    InvalidUpdateError
        Naming `sender` and the first offending tensor (or the update's norm).
    """
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        raise InvalidUpdateError(
            f"{sender}: update lacks {len(missing)} tensors, e.g. '{missing[0]}'."
        )
    if extra:
        # An extra name could be a base-model weight: only adapter tensors may travel.
        # !r: the name is the sender's, and a line break in it would forge a log line
        raise InvalidUpdateError(f"{sender}: update carries unexpected tensor {extra[0]!r}.")
    squared = 0.0
    for name, shape in expected.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(shape):
            raise InvalidUpdateError(
                f"{sender}: tensor '{name}' has shape {tuple(value.shape)}, "
                f"expected {tuple(shape)}."
            )
        if value.dtype != WIRE_DTYPE:
            # the declared dtype is WIRE_DTYPE; the message keeps its old wording
            raise InvalidUpdateError(f"{sender}: tensor '{name}' has dtype {value.dtype}.")
        if not np.all(np.isfinite(value)):
            raise InvalidUpdateError(f"{sender}: tensor '{name}' holds NaN or infinite values.")
        delta = value if reference is None else value - reference[name]
        squared += float(np.sum(np.square(delta, dtype=np.float64)))
    norm = math.sqrt(squared)
    if not norm <= max_norm:
        raise InvalidUpdateError(
            f"{sender}: update has L2 norm {norm:.4g}, above validate.max-update-norm = "
            f"{max_norm:g}."
        )
