"""The coordinator's checkpoint under HE: the encrypted global adapter, never plaintext.

One safetensors file of byte tensors (one per ciphertext) whose metadata says how to read
them: the key id, the public total weight to divide by, and the packing layout. Only a holder
of the secret context can turn it into a peft adapter (`fedllm he decrypt`). With an at-rest
key the file is sealed on top (`encrypted_adapter.safetensors.aes`, metadata included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from fedllm.disk import atomic_dir
from fedllm.errors import RunDirError
from fedllm.secure.at_rest import checkpoint_label, read_file, write_file
from fedllm.secure.packing import Packing

if TYPE_CHECKING:
    from fedllm.secure.at_rest import AtRestKey

__all__ = [
    "ENCRYPTED_ADAPTER",
    "EncryptedAdapter",
    "load_encrypted_adapter",
    "save_encrypted_adapter",
]

ENCRYPTED_ADAPTER = "encrypted_adapter.safetensors"
FORMAT = "fedllm-ckks/1"


@dataclass(frozen=True)
class EncryptedAdapter:
    """The global adapter as the server holds it: Σ w_k x_k encrypted, and D = Σ w_k."""

    blobs: list[bytes]
    divisor: float
    key: str
    packing: Packing


def save_encrypted_adapter(
    directory: Path, adapter: EncryptedAdapter, *, model: str, at_rest: AtRestKey | None = None
) -> None:
    """Write atomically (temporary directory, then rename), like the plaintext checkpoints
    (a failed write is a `DiskError` naming the checkpoint); sealed under `at_rest` if given."""
    directory = Path(directory)
    tensors = {
        f"ckks-{i:05d}": np.frombuffer(b, dtype=np.uint8) for i, b in enumerate(adapter.blobs)
    }
    p = adapter.packing
    metadata = {
        "format": FORMAT,
        "key_id": adapter.key,
        "divisor": repr(float(adapter.divisor)),
        "names": json.dumps(list(p.names)),
        "shapes": json.dumps([list(s) for s in p.shapes]),
        "slots": str(p.slots),
        "model": model,
    }
    label = checkpoint_label(directory, ENCRYPTED_ADAPTER)
    data = save_tensors(tensors, metadata=metadata)
    with atomic_dir(directory) as tmp:
        write_file(tmp / ENCRYPTED_ADAPTER, data, at_rest, label=label)


def _metadata(data: bytes) -> dict[str, str]:
    """A safetensors file's `__metadata__`: its header is an 8-byte little-endian length
    and that much JSON (`safetensors.numpy.load` reads only the tensors from bytes)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def load_encrypted_adapter(
    directory: Path, *, at_rest: AtRestKey | None = None
) -> EncryptedAdapter:
    """The encrypted adapter in `directory` (opened under `at_rest` if sealed at rest)."""
    path = Path(directory) / ENCRYPTED_ADAPTER
    label = checkpoint_label(Path(directory), ENCRYPTED_ADAPTER)
    try:
        data = read_file(path, at_rest, label=label)
    except FileNotFoundError as e:
        raise RunDirError(f"{path} is missing: this checkpoint holds no encrypted adapter.") from e
    try:
        tensors = load_tensors(data)
        blobs = [tensors[n].tobytes() for n in sorted(tensors)]
        meta = _metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        packing = Packing(
            tuple(json.loads(meta["names"])),
            tuple(tuple(s) for s in json.loads(meta["shapes"])),
            int(meta["slots"]),
        )
        return EncryptedAdapter(blobs, float(meta["divisor"]), meta["key_id"], packing)
    except (KeyError, ValueError, OSError, SafetensorError) as e:
        raise RunDirError(f"{path} is not a readable encrypted adapter ({e}).") from e
