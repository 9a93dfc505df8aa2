"""Lay an adapter's tensors out in CKKS slots, one check slot per ciphertext.

Pure numpy. Every tensor that travels is flattened in a fixed name order and cut into
chunks of `slots - 1` values; the last slot of every chunk carries the sender's public
weight w. A site packs w * x, so the server's plain ciphertext sum holds sum_k w_k x_k and
sum_k w_k in every check slot. Whoever decrypts divides by the public total weight D and
checks each chunk's check slot against D: a contribution encrypted under another key, with
other parameters, or corrupted in transit decrypts to garbage in that slot, so it is refused
rather than silently averaged in. TenSEAL's CKKSVector holds at most one ciphertext's slots,
so the chunking is ours.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from fedllm.errors import InvalidUpdateError

__all__ = ["CHECK_TOLERANCE", "Packing", "share_weight"]

# Relative tolerance on the check slot: CKKS error at scale >= 2^20 is far below it, a
# foreign-key or corrupted ciphertext decrypts to values of order 2^(headroom) instead.
CHECK_TOLERANCE = 1e-3


def share_weight(*, user_level: bool, num_examples: int, unit: float, num_sites: int) -> float:
    """A site's public weight: 1/n under distributed DP (every site counts once), else its
    examples / the federation's examples. The site encrypts with it and the coordinator
    checks it, so both take it from here. Weights sum to about 1, which keeps the encrypted
    sum as small as its largest value: the CKKS scale buys precision, not headroom."""
    return 1.0 / num_sites if user_level else float(num_examples) / unit


@dataclass(frozen=True)
class Packing:
    """Where each tensor's values sit in the chunk sequence."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    slots: int

    @classmethod
    def for_arrays(cls, shapes: dict[str, tuple[int, ...]], slots: int) -> Packing:
        if slots < 2:
            raise ValueError("a chunk needs at least one value slot and the check slot")
        return cls(tuple(shapes), tuple(tuple(s) for s in shapes.values()), slots)

    @property
    def per_chunk(self) -> int:
        return self.slots - 1

    @property
    def num_values(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes))

    @property
    def chunk_sizes(self) -> list[int]:
        """Encrypted vector length of every chunk: its values plus the check slot."""
        full, rest = divmod(self.num_values, self.per_chunk)
        return [self.slots] * full + ([rest + 1] if rest else [])

    def pack(self, arrays: dict[str, np.ndarray], weight: float) -> list[np.ndarray]:
        """`weight * arrays`, chunked, each chunk ending in `weight` (float64 for CKKS).

        Raises
        ------
        InvalidUpdateError
            If a tensor of the layout is missing or has another shape (one of the same size
            would otherwise be laid into another tensor's slots). Names outside the layout
            are not packed: only the layout's tensors travel.
        """
        for name, shape in zip(self.names, self.shapes, strict=True):
            if name not in arrays:
                raise InvalidUpdateError(f"tensor '{name}' of the packing layout is missing.")
            if np.shape(arrays[name]) != shape:
                raise InvalidUpdateError(
                    f"tensor '{name}' has shape {np.shape(arrays[name])}, the packing layout "
                    f"expects {shape}."
                )
        flat = np.concatenate(
            [np.asarray(arrays[n], dtype=np.float64).reshape(-1) for n in self.names]
        )
        flat *= weight
        chunks = []
        for start in range(0, flat.size, self.per_chunk):
            body = flat[start : start + self.per_chunk]
            chunks.append(np.append(body, weight))
        return chunks

    def unpack(
        self, chunks: list[np.ndarray], divisor: float, *, what: str = "the aggregate"
    ) -> dict[str, np.ndarray]:
        """Divide the decrypted sum by `divisor` after checking every check slot equals it.

        Raises
        ------
        InvalidUpdateError
            If a chunk is missing, has the wrong length, or fails its check slot, or if a
            value divided by `divisor` is NaN or past float32's range (a divisor of 0).
        """
        sizes = self.chunk_sizes
        if len(chunks) != len(sizes):
            raise InvalidUpdateError(f"{what} has {len(chunks)} chunks, expected {len(sizes)}.")
        bodies = []
        for i, (chunk, size) in enumerate(zip(chunks, sizes, strict=True)):
            chunk = np.asarray(chunk, dtype=np.float64)
            if chunk.size != size:
                raise InvalidUpdateError(
                    f"{what}: chunk {i} holds {chunk.size} values, expected {size}."
                )
            check = float(chunk[-1])
            if not abs(check - divisor) <= CHECK_TOLERANCE * max(1.0, abs(divisor)):
                raise InvalidUpdateError(
                    f"{what} failed its integrity check in chunk {i} (check slot {check:.6g}, "
                    f"expected the total weight {divisor:.6g}): a contribution was encrypted "
                    "under another key or parameters, or corrupted; it is not used."
                )
            bodies.append(chunk[:-1])
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            flat = (np.concatenate(bodies) / divisor).astype(np.float32)
        if not np.all(np.isfinite(flat)):
            raise InvalidUpdateError(
                f"{what} divided by its total weight {divisor:.6g} gives NaN or values past "
                "float32's range; it is not used."
            )
        out: dict[str, np.ndarray] = OrderedDict()
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = math.prod(shape)
            out[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return out
