"""Encryption at rest: checkpoints and ledger records sealed with AES-256-GCM under a key file.

Off by default (`security.at-rest-key = ""`). With a key, every adapter tensor file and every
ledger record is written sealed, and every reader opens it with the same key. A sealed blob
describes itself, so a reader tells a sealed blob from plaintext and a wrong key from a
corrupt file, and says which::

    b"fedllm-at-rest" | version (1 byte) | key id (16 hex) | nonce (12 bytes) | ciphertext + tag

The header is authenticated (it is part of the associated data), the nonce is random per
message (96 bits: no counter to keep across processes and crashes), and the associated data
also binds each blob to what it is (`checkpoint_label`, the ledger's record number), so a
sealed file or record moved to another place does not open.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedllm.errors import FedllmError, KeyFileError
from fedllm.secure.keyfiles import check_private, write_new

__all__ = [
    "SUFFIX",
    "AtRestError",
    "AtRestKey",
    "checkpoint_label",
    "configured_key",
    "is_sealed",
    "load_key",
    "make_key_file",
    "open_sealed",
    "read_file",
    "seal",
    "stored_file",
    "write_file",
]

MAGIC = b"fedllm-at-rest"
VERSION = 1
KEY_BYTES = 32
ID_CHARS = 16
NONCE_BYTES = 12
TAG_BYTES = 16
SUFFIX = ".aes"  # a sealed file's name: the plaintext name + ".aes"
_ID_AT = len(MAGIC) + 1
_NONCE_AT = _ID_AT + ID_CHARS
_BODY_AT = _NONCE_AT + NONCE_BYTES
_MAX_PLAINTEXT = 2**31 - 1  # one AES-GCM message in `cryptography`
WHAT = "the at-rest key (security.at-rest-key)"


class AtRestError(FedllmError):
    """A sealed file or record cannot be opened: wrong key, tampered, or plaintext instead."""


@dataclass(frozen=True)
class AtRestKey:
    """A loaded at-rest key: its 32 secret bytes (never shown), its id and its file."""

    secret: bytes = field(repr=False)
    id: str
    path: Path


def _key(secret: bytes, path: Path) -> AtRestKey:
    # The id names a key in messages and headers without revealing it.
    return AtRestKey(secret, hashlib.sha256(secret).hexdigest()[:ID_CHARS], path)


def make_key_file(path: Path, *, force: bool = False) -> AtRestKey:
    """Write a new random 256-bit key (mode 0600); an existing file is kept unless `force`."""
    path = Path(path)
    secret = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    write_new(path, secret, 0o600, force=force)
    return _key(secret, path)


def load_key(path: Path, *, what: str = WHAT) -> AtRestKey:
    """The key in `path`; refused when missing, readable by others, or not 32 bytes."""
    path = Path(path).expanduser()
    secret = check_private(path, what)
    if len(secret) != KEY_BYTES:
        raise KeyFileError(
            f"{path} holds {len(secret)} bytes, not a {KEY_BYTES}-byte at-rest key; make one "
            "with `fedllm keys at-rest-init`."
        )
    return _key(secret, path)


def configured_key(setting: str, *, what: str = WHAT) -> AtRestKey | None:
    """The key a setting names (security.at-rest-key, a node config, `--at-rest-key`);
    None when it is empty (off). A key that is named but unusable raises, never None."""
    return load_key(Path(setting), what=what) if setting else None


def _header(key_id: str) -> bytes:
    return MAGIC + bytes([VERSION]) + key_id.encode("ascii")


def is_sealed(blob: bytes) -> bool:
    """Whether `blob` starts like a sealed blob (it may still fail to open)."""
    return blob.startswith(MAGIC)


def _stored_id(blob: bytes) -> str:
    """The key id a blob's header names, printable: a damaged header holds any bytes, and
    a line break among them would split the one-line error that shows it."""
    text = blob[_ID_AT:_NONCE_AT].decode("ascii", errors="replace")
    return "".join(c if c.isprintable() else "?" for c in text)


def seal(key: AtRestKey, plaintext: bytes, *, aad: bytes) -> bytes:
    """`plaintext` encrypted and authenticated under `key`, bound to `aad` and the header."""
    if len(plaintext) > _MAX_PLAINTEXT:
        raise AtRestError(
            f"{len(plaintext):,} bytes are too many to seal in one AES-GCM message "
            f"(at most {_MAX_PLAINTEXT:,})."
        )
    header = _header(key.id)
    nonce = os.urandom(NONCE_BYTES)
    return header + nonce + AESGCM(key.secret).encrypt(nonce, plaintext, header + aad)


def open_sealed(key: AtRestKey, blob: bytes, *, aad: bytes, what: str) -> bytes:
    """The plaintext of a sealed `blob`; `what` names it (a file, a ledger line) in errors.

    Raises
    ------
    AtRestError
        If `blob` is not sealed, is of another format version, was sealed under another
        key, or fails its integrity check (tampered, corrupt, or bound to another place).
    """
    if not is_sealed(blob):
        raise AtRestError(
            f"{what} has no fedllm-at-rest header (plaintext or corrupt), but an at-rest key "
            f"is set ({key.path}); refusing it."
        )
    version = blob[len(MAGIC)] if len(blob) > len(MAGIC) else None
    if version != VERSION:
        raise AtRestError(
            f"{what} uses at-rest format version {version}; this fedllm reads version {VERSION}."
        )
    if len(blob) < _BODY_AT + TAG_BYTES:
        raise AtRestError(f"{what} is truncated: shorter than its at-rest header and tag.")
    stored = _stored_id(blob)
    if stored != key.id:
        raise AtRestError(
            f"{what} was encrypted under at-rest key {stored}, not {key.id} ({key.path}, "
            "security.at-rest-key); use the key it was written with."
        )
    try:
        return AESGCM(key.secret).decrypt(
            blob[_NONCE_AT:_BODY_AT], blob[_BODY_AT:], blob[:_NONCE_AT] + aad
        )
    except InvalidTag:
        raise AtRestError(
            f"{what} fails its AES-GCM integrity check (tampered or corrupt, or moved from "
            "another place); it was not used."
        ) from None


# -- files -------------------------------------------------------------------------------------
def checkpoint_label(directory: Path, name: str) -> str:
    """What a checkpoint file is bound to: its directory's name (`round-3`) and its own.

    A sealed round-2 file copied over round 3 (a silent rollback of the global adapter) or
    one role's file renamed to another's then fails its integrity check. The run directory
    itself is left out, so a copy of the run (an auditor's) still opens.
    """
    return f"checkpoint {Path(directory).name}/{name}"


def _file_aad(label: str) -> bytes:
    return f"fedllm file|{label}".encode()


def _sealed_path(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def stored_file(path: Path) -> Path | None:
    """`path` or its sealed twin `path.aes`, whichever exists (None: neither)."""
    for candidate in (_sealed_path(Path(path)), Path(path)):
        if candidate.is_file():
            return candidate
    return None


def write_file(path: Path, data: bytes, key: AtRestKey | None, *, label: str) -> Path:
    """Write `data` at `path`, or sealed under `key` at `path.aes`; returns what was written.

    Not atomic on its own: checkpoint writers fill a temporary directory and rename it.
    """
    path = Path(path)
    target = path if key is None else _sealed_path(path)
    target.write_bytes(data if key is None else seal(key, data, aad=_file_aad(label)))
    return target


def read_file(path: Path, key: AtRestKey | None, *, label: str) -> bytes:
    """The plaintext of `path` or of `path.aes`: a sealed file needs `key`, and a plaintext
    file is refused when `key` is set (what should be sealed is not trusted in plaintext).

    Raises
    ------
    AtRestError
        If the file is sealed and no key is given, plaintext while a key is set, or does
        not open (see `open_sealed`).
    FileNotFoundError
        If neither file exists.
    """
    path = Path(path)
    found = stored_file(path)
    if found is None:
        raise FileNotFoundError(f"{path} is missing (and so is {_sealed_path(path).name}).")
    data = found.read_bytes()
    if found != path:
        if key is None:
            sealed_by = _stored_id(data)
            raise AtRestError(
                f"{found} is encrypted at rest (key {sealed_by}); give its key: "
                "security.at-rest-key, or --at-rest-key PATH."
            )
        return open_sealed(key, data, aad=_file_aad(label), what=str(found))
    if key is not None:
        raise AtRestError(
            f"{path} is plaintext, but an at-rest key is set ({key.path}), so it should be "
            f"sealed as {found.name}{SUFFIX}; refusing it (written without the key, or replaced)."
        )
    return data
