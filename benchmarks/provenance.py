"""Where a benchmark result came from, written into the result by the run that made it.

A committed figure is only evidence if one run of one script produced all of it, and a reader
can see which run: the exact command line, the commit (and whether the tree differed from it),
the machine, the package versions, and when it started and ended. Every script in
`benchmarks/` opens a `BenchmarkRun` first and writes its result through it, whole and
atomically: a result is never extended by hand or by a later run.

Artefacts that a script could take from an earlier invocation (a finished federated run in a
`--work` directory) are refused unless the user passes `--reuse`; a reused artefact is then
named in the result together with the provenance of the run that made it, and one without a
provenance record is refused even then.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedllm.rundir import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE_FILE = "benchmark-provenance.json"  # beside an artefact a benchmark made

__all__ = [
    "BenchmarkRun",
    "abba",
    "add_work_arguments",
    "machine_facts",
    "rotation",
    "source_state",
]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def source_state(root: Path = ROOT) -> dict[str, Any]:
    """The commit the code ran at and whether the working tree differed from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        # rstrip only: a porcelain line starts with its status column, often a space
        return done.stdout.rstrip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        # None: not a git checkout (an installed copy), so cleanliness is unknown.
        "dirty": None if status is None else bool(status),
        "changed_files": None if not status else [line[3:] for line in status.splitlines()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """GPU names: torch's where the benchmark loaded torch (never imported here: it is slow),
    else `nvidia-smi`'s, so a benchmark that runs its work in subprocesses records them too."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return (
        [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if done.returncode == 0
        else []
    )


def _cuda() -> str | None:
    """The CUDA version torch was built with, where the benchmark loaded torch."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.version.cuda


# Beyond what a run's summary names: what the benchmarks' own mechanisms run on.
_MORE_PACKAGES = (
    "dp-accounting",
    "tenseal",
    "cryptography",
    "datasets",
    "flwr-datasets",
    "ray",
    "scikit-learn",
    "sentence-transformers",
)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    from fedllm.summary import package_versions

    out = package_versions()
    for name in _MORE_PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine_facts() -> dict[str, Any]:
    """CPU model, cores (all and usable here), memory, GPUs and CUDA, OS and package versions."""

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "memory_gib": _memory_gib(),
        "gpus": _gpus(),
        "cuda": _cuda(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": _versions(),
    }


def add_work_arguments(parser: argparse.ArgumentParser) -> None:
    """`--work DIR` and `--reuse`, for scripts whose artefacts a later invocation could take."""
    parser.add_argument("--work", help="working directory (default: a fresh temporary one)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take finished artefacts already in --work (the result names each, and its maker)",
    )


def rotation(sides: Sequence[str], passes: int) -> Iterator[tuple[int, str]]:
    """`(pass, side)` with the sides in order, then reversed, and so on (A B C C B A A B C
    ...): `abba` for more than two sides, so load drift weighs on every side alike."""
    for number in range(passes):
        for side in sides if number % 2 == 0 else list(reversed(sides)):
            yield number, side


def abba(pairs: int) -> Iterator[tuple[int, str]]:
    """`(pair, "A" | "B")` in the order A B B A A B B A ...: a drift in machine load over
    the run then weighs on both sides alike instead of always on the one measured second."""
    for pair in range(pairs):
        for side in "AB" if pair % 2 == 0 else "BA":
            yield pair, side


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fresh_work(given: str | None, prefix: str) -> Path:
    """The benchmark's working directory: `given` (`--work`), or a new temporary one; a
    directory already holding files is refused, so no figure silently reuses a run."""
    work = Path(given or tempfile.mkdtemp(prefix=prefix))
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"{work} is not empty; give a fresh --work directory.")
    work.mkdir(parents=True, exist_ok=True)
    return work


class BenchmarkRun:
    """One invocation of a benchmark script: its provenance, the artefacts it made or reused,
    and the single write of its result."""

    def __init__(self, benchmark: str, *, allow_reuse: bool = False) -> None:
        self.benchmark = benchmark
        self.allow_reuse = allow_reuse
        self.command = shlex.join([Path(sys.executable).name, *sys.argv])
        self.started = _now()
        self._t0 = time.monotonic()
        self.source = source_state()
        self.made: list[str] = []
        self.reused: list[dict[str, Any]] = []

    def _record(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "command": self.command,
            "cwd": os.getcwd(),
            **self.source,
            "started": self.started,
        }

    def mark_made(self, artefact: Path) -> None:
        """Record that this run made `artefact` (a directory), once it is complete, so a later
        `--reuse` can name where it came from."""
        write_json_atomic(artefact / PROVENANCE_FILE, self._record())
        self.made.append(str(artefact))

    def reuse(self, artefact: Path) -> bool:
        """True when `artefact` (a directory) exists and this run may take it as it is.

        Without `--reuse` an existing artefact is refused: the result would silently mix two
        runs. With it, the artefact is named in the result with the provenance its maker
        recorded once it was complete; one without that record (a crashed or hand-made
        directory) is refused even then.
        """
        if not artefact.exists():
            return False
        if not self.allow_reuse:
            raise SystemExit(
                f"{artefact} already exists; pass --reuse to reuse it (the result then names "
                "it and the run that made it), or give a fresh --work directory."
            )
        origin = artefact / PROVENANCE_FILE
        if not origin.is_file():
            raise SystemExit(
                f"{artefact} has no {PROVENANCE_FILE}: it is unfinished or no benchmark run "
                "made it, so it cannot be reused; remove it or give a fresh --work directory."
            )
        self.reused.append({"artefact": str(artefact), "made_by": json.loads(origin.read_text())})
        return True

    def write(self, out: Path | str, result: dict[str, Any]) -> dict[str, Any]:
        """Write `result` with this run's provenance as one JSON file, atomically."""
        whole = {
            "benchmark": self.benchmark,
            **result,
            "provenance": {
                **self._record(),
                "finished": _now(),
                "wall_seconds": round(time.monotonic() - self._t0, 1),
                "machine": machine_facts(),
                "artefacts_made": self.made,
                "artefacts_reused": self.reused,
            },
        }
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, whole)  # the run directory's own atomic write (fsync, rename)
        print(f"wrote {out}", flush=True)
        return whole
