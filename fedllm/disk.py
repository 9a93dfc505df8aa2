"""The disk a run writes to: checked before the run starts, written atomically, and a write
that fails is one line naming its file.

A run may go on for hours, so a folder it cannot write, or a disk that cannot hold its
checkpoints, is found before any site is waited for (`check_output_folder`). A write that
still fails later (the disk filled up meanwhile) must neither leave half a file under its
final name nor end in a traceback: the run directory's JSON files, its plot and its
checkpoints are written to a temporary sibling and renamed into place (`atomic_file`,
`atomic_dir`; a ledger is appended to, and a torn last line is not a record), and an
`OSError` on the way becomes a `DiskError` naming the file and the OS's reason (`writing`).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fedllm.errors import DiskError

if TYPE_CHECKING:
    from fedllm.config import FedllmConfig

__all__ = [
    "atomic_dir",
    "atomic_file",
    "check_output_folder",
    "checkpoint_bytes",
    "fsync_path",
    "needed_bytes",
    "os_reason",
    "writing",
]

FP32 = 4
# Each remaining round is counted at twice its checkpoint: state.json, summary.json, the
# ledgers and the reports grow every round too, and a checkpoint that replaces one left by
# an interrupted attempt exists twice for a moment.
HEADROOM = 2
MARGIN = 16 * 2**20  # the config, the plots and the reports, whatever the rounds
FILE_OVERHEAD = 16 * 1024  # a checkpoint's JSON files and its safetensors header
TENSOR_OVERHEAD = 256  # a tensor's entry in the safetensors header (its name, shape, offsets)
CIPHERTEXT_OVERHEAD = 4096  # TenSEAL's and SEAL's headers around one ciphertext


class AdapterShapes(Protocol):
    """What the estimate reads of `fedllm.model.AdapterSpec` (which needs torch to import)."""

    shapes: dict[str, tuple[int, ...]]
    sent: tuple[str, ...]


def checkpoint_bytes(cfg: FedllmConfig, spec: AdapterShapes) -> int:
    """An upper bound on one round's checkpoint: every adapter tensor in float32, or under HE
    the ciphertexts of the tensors that travel, plus the files' headers. A CKKS ciphertext
    holds N/2 slots (one of them a check slot, `fedllm.secure.packing`) in two polynomials of
    N coefficients, at most 8 bytes per coefficient and prime of the chain."""
    sizes = {name: math.prod(shape) for name, shape in spec.shapes.items()}
    if cfg.strategy.secure_aggregation == "he":
        he = cfg.he.params
        n, primes = he.poly_modulus_degree, len(he.coeff_mod_bit_sizes)
        ciphertexts = math.ceil(sum(sizes[name] for name in spec.sent) / (he.slots - 1))
        data, tensors = ciphertexts * (2 * n * primes * 8 + CIPHERTEXT_OVERHEAD), ciphertexts
    else:
        data, tensors = FP32 * sum(sizes.values()), len(sizes)
    return data + tensors * TENSOR_OVERHEAD + FILE_OVERHEAD


def needed_bytes(cfg: FedllmConfig, spec: AdapterShapes, *, rounds_done: int) -> int:
    """What the rest of the run is counted to write: `HEADROOM` checkpoints for every round
    still to run, plus `MARGIN`."""
    rounds_left = max(cfg.run.rounds - rounds_done, 0)
    return rounds_left * HEADROOM * checkpoint_bytes(cfg, spec) + MARGIN


def check_output_folder(run_path: Path, *, needed: int) -> None:
    """The run directory, or the nearest folder above it that exists (the run makes the
    rest), takes a file (created, fsync'd and removed) and has `needed` bytes free; else one
    `DiskError` naming the folder. Nothing is left behind: a new run's directory still
    appears only once round 0 has succeeded."""
    folder = next(p for p in (run_path, *run_path.parents) if p.exists())
    if not folder.is_dir():
        raise DiskError(
            f"{folder} is not a folder, so the run directory {run_path} cannot be made; "
            "choose another run.output-dir."
        )
    probe = folder / f".fedllm-write-test-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"fedllm")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as e:
        raise DiskError(
            f"cannot write in {folder} ({os_reason(e)}), where the run directory {run_path} "
            "goes; make it writable or choose another run.output-dir."
        ) from e
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskError(
            f"{folder} has {_size(free)} free, and the run directory {run_path} needs about "
            f"{_size(needed)} (every remaining round's checkpoint, with room to spare); free "
            "some space or choose another run.output-dir."
        )


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so the names in it are durable too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"


def os_reason(e: OSError) -> str:
    """The OS's reason (`[Errno 28] No space left on device`) without the file name, which
    the caller names better (the final name, not a temporary one)."""
    return f"[Errno {e.errno}] {e.strerror}" if e.errno and e.strerror else str(e)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An `OSError` inside becomes one `DiskError`: "could not write PATH: [Errno ..] ..."
    (PATH absolute: a site's paths may be relative to where its process runs)."""
    try:
        yield
    except OSError as e:
        raise DiskError(f"could not write {Path(path).absolute()}: {os_reason(e)}") from e


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write: renamed onto `path` when the block ends,
    removed if it fails, so `path` holds its old content or the new, never part of either."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            yield tmp
            tmp.replace(path)
            fsync_path(path.parent)
        except BaseException:
            with suppress(OSError):
                tmp.unlink()
            raise


@contextmanager
def atomic_dir(directory: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `directory` to fill: renamed to `directory` (replacing
    it) when the block ends, removed if it fails, so no half directory ever has the final
    name."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    with writing(directory):
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted write left
        tmp.mkdir(parents=True)
        try:
            yield tmp
            for written in tmp.rglob("*"):  # on disk before the name says it is complete
                if written.is_file():
                    fsync_path(written)
            if directory.exists():
                shutil.rmtree(directory)
            tmp.rename(directory)
            fsync_path(directory.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
