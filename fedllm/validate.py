"""Checks on an incoming adapter update before it may touch the aggregate."""

from __future__ import annotations

import numpy as np

from fedllm.errors import InvalidUpdateError

__all__ = ["check_update"]


def check_update(
    arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], *, sender: str
) -> None:
    """Refuse an update whose names, shapes, dtypes or values are not a valid adapter.

    Raises
    ------
    InvalidUpdateError
        Naming `sender` and the first offending tensor.
    """
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing:
        raise InvalidUpdateError(
            f"{sender}: update lacks {len(missing)} tensors, e.g. '{missing[0]}'."
        )
    if extra:
        # An extra name could be a base-model weight: only adapter tensors may travel.
        raise InvalidUpdateError(f"{sender}: update carries unexpected tensor '{extra[0]}'.")
    for name, shape in expected.items():
        value = arrays[name]
        if tuple(value.shape) != tuple(shape):
            raise InvalidUpdateError(
                f"{sender}: tensor '{name}' has shape {tuple(value.shape)}, "
                f"expected {tuple(shape)}."
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise InvalidUpdateError(f"{sender}: tensor '{name}' has dtype {value.dtype}.")
        if not np.all(np.isfinite(value)):
            raise InvalidUpdateError(f"{sender}: tensor '{name}' holds NaN or infinite values.")
