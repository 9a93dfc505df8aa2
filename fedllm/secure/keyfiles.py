"""Key files on disk: written once (0600 for secrets), refused when others can read them.

Every key fedllm makes (CKKS contexts, the CA, TLS and node-auth keys, signing keys, the
at-rest key) goes through these two functions, so the rules are the same everywhere.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedllm.errors import KeyFileError

__all__ = ["check_private", "write_new"]


def write_new(path: Path, data: bytes, mode: int, *, force: bool = False) -> None:
    """Write `data` atomically with `mode`; an existing file is kept unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise KeyFileError(f"{path} exists; refusing to overwrite keys (use --force).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)  # the umask may have narrowed os.open's mode
    tmp.replace(path)


def check_private(path: Path, what: str) -> bytes:
    """The bytes of a secret key file; refused when missing or readable by group/others."""
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{what}: no file at {path}.")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{path} holds {what} but is readable by others (mode {mode:o}); "
            f"run `chmod 600 {path}`."
        )
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path} ({what}) cannot be read: {e.strerror}.") from e
