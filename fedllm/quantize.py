"""Smaller updates: float16 and blockwise absmax int8 encodings of a tensor (pure numpy).

Blockwise absmax int8 is the scheme of bitsandbytes' block-wise quantisation (Dettmers et
al. 2022, "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861) with the linear
absmax code of LLM.int8() (arXiv 2208.07339) rather than bitsandbytes' dynamic map: the
tensor, flattened in C order, is cut into blocks of `block` values (the last one may be
shorter); each block keeps its largest magnitude as a float32 scale `s` and each value
becomes the integer nearest to 127 * x / s, so |x - decoded| <= s / 254 per value.

Written here rather than taken from a library: bitsandbytes is not installed and needs CUDA
for most of its kernels; gguf's numpy `Q8_0` (installed with transformers' GGUF support) is
the same idea but fixes the block at 32 and stores the scale as float16, which rounds it
(a code can then leave [-127, 127]) and cannot hold a scale above 65504.

Encoding is deterministic (round half to even, no stochastic rounding): the same tensor
always gives the same bytes, so a reply a site replays is encoded, and signed, identically.
"""

from __future__ import annotations

import numpy as np

from fedllm.errors import InvalidUpdateError

__all__ = [
    "ENCODINGS",
    "FP16_MAX",
    "INT8_LEVELS",
    "decode_fp16",
    "decode_int8",
    "encode_fp16",
    "encode_int8",
    "num_blocks",
]

ENCODINGS = ("fp32", "fp16", "int8")  # strategy.update-encoding: fp32 sends tensors as they are
INT8_LEVELS = 127  # codes lie in [-127, 127]: symmetric, so -128 never occurs
FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def num_blocks(size: int, block: int) -> int:
    """How many blocks (and so scales) a tensor of `size` values has: the last may be short."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}.")
    return -(-size // block)


def _finite(values: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise InvalidUpdateError(f"tensor {name!r} holds NaN or infinite values: not encoded.")
    return values


def encode_fp16(values: np.ndarray, *, name: str = "tensor") -> np.ndarray:
    """`values` as float16 (same shape). Values beyond float16's range (|x| > 65504) are
    refused rather than sent as inf; magnitudes below 6.1e-5 lose relative precision
    (float16 subnormals), which for an update is an absolute error below 3e-8.

    Raises
    ------
    InvalidUpdateError
        If a value is NaN, infinite or outside float16's range.
    """
    values = _finite(np.asarray(values), name)
    if values.size and float(np.max(np.abs(values))) > FP16_MAX:
        raise InvalidUpdateError(
            f"tensor {name!r} has values beyond float16's range ({FP16_MAX:g}): use int8 or fp32."
        )
    return values.astype(np.float16)


def decode_fp16(codes: np.ndarray) -> np.ndarray:
    """float16 values back as float64 (exact)."""
    return np.asarray(codes).astype(np.float64)


def encode_int8(
    values: np.ndarray, *, block: int, name: str = "tensor"
) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax int8 codes (same shape as `values`, int8) and the per-block scales
    (float32, shape `(num_blocks(values.size, block),)`). A block of zeros has scale 0 and
    codes 0.

    Raises
    ------
    InvalidUpdateError
        If a value is NaN or infinite (no scale can hold it).
    """
    values = _finite(np.asarray(values, dtype=np.float32), name)
    flat = values.ravel()
    n, nb = flat.size, num_blocks(flat.size, block)
    padded = np.zeros(nb * block, dtype=np.float64)
    padded[:n] = flat
    blocks = padded.reshape(nb, block)
    # the scale is a float32 value of the tensor itself, so |x| <= scale holds exactly
    scales = np.abs(blocks).max(axis=1).astype(np.float32) if nb else np.zeros(0, np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float64)[:, None]
    codes = np.rint(blocks * INT8_LEVELS / safe)
    codes = np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return codes.ravel()[:n].reshape(values.shape), scales


def decode_int8(codes: np.ndarray, scales: np.ndarray, *, block: int) -> np.ndarray:
    """The values `encode_int8` encoded, as float64 of `codes`' shape: code * scale / 127.

    Raises
    ------
    InvalidUpdateError
        If the codes are not int8 in [-127, 127], or the scales are not float32 of one
        finite, non-negative value per block.
    """
    codes, scales = np.asarray(codes), np.asarray(scales)
    if codes.dtype != np.int8:
        raise InvalidUpdateError(f"codes have dtype {codes.dtype}, expected int8.")
    if codes.size and int(codes.min()) < -INT8_LEVELS:
        raise InvalidUpdateError(f"codes hold -128, outside [-{INT8_LEVELS}, {INT8_LEVELS}].")
    nb = num_blocks(codes.size, block)
    if scales.dtype != np.float32:
        raise InvalidUpdateError(f"scales have dtype {scales.dtype}, expected float32.")
    if scales.shape != (nb,):
        raise InvalidUpdateError(
            f"scales have shape {scales.shape}, expected ({nb},) for {codes.size} values in "
            f"blocks of {block}."
        )
    if not np.all(np.isfinite(scales)) or (nb and float(scales.min()) < 0):
        raise InvalidUpdateError("scales hold NaN, infinite or negative values.")
    per_value = np.repeat(scales.astype(np.float64), block)[: codes.size]
    return (codes.ravel().astype(np.float64) * per_value / INT8_LEVELS).reshape(codes.shape)
