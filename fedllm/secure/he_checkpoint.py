"""The coordinator's checkpoint under HE: the encrypted global adapter, never plaintext.

One safetensors file of byte tensors (one per ciphertext) whose metadata says how to read
them: the key id, the public total weight to divide by, and the packing layout. Only a holder
of the secret context can turn it into a peft adapter (`fedllm he decrypt`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedllm.errors import RunDirError
from fedllm.secure.packing import Packing

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


def save_encrypted_adapter(directory: Path, adapter: EncryptedAdapter, *, model: str) -> None:
    """Write atomically (temporary directory, then rename), like the plaintext checkpoints."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    save_file(tensors, str(tmp / ENCRYPTED_ADAPTER), metadata=metadata)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_encrypted_adapter(directory: Path) -> EncryptedAdapter:
    from safetensors import safe_open

    path = Path(directory) / ENCRYPTED_ADAPTER
    if not path.is_file():
        raise RunDirError(f"{path} is missing: this checkpoint holds no encrypted adapter.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            names = sorted(f.keys())
            blobs = [f.get_tensor(n).tobytes() for n in names]
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        packing = Packing(
            tuple(json.loads(meta["names"])),
            tuple(tuple(s) for s in json.loads(meta["shapes"])),
            int(meta["slots"]),
        )
        return EncryptedAdapter(blobs, float(meta["divisor"]), meta["key_id"], packing)
    except (KeyError, ValueError, OSError) as e:
        raise RunDirError(f"{path} is not a readable encrypted adapter ({e}).") from e
