"""`fedllm bench [NAME ...]`: run the benchmark suite of a fedllm checkout.

The benchmarks live in the repository (`benchmarks/`), not in the installed package, so this
verb finds the checkout (the current folder or one above it, else the one this package was
installed from in editable mode) and runs `python -m benchmarks` there as its own process:
nothing under `fedllm/` imports `benchmarks`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedllm.errors import BenchmarksNotFoundError

__all__ = ["add_parsers", "add_suite_arguments", "find_checkout"]

_MARKER = Path("benchmarks") / "suite.py"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install


def add_suite_arguments(parser: argparse.ArgumentParser) -> None:
    """The suite's flags, shared by `fedllm bench` and `python -m benchmarks`."""
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="benchmarks to run (default: every one that is not long); `table` alone "
        "regenerates benchmarks/README.md",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks (long or not) and exit"
    )
    parser.add_argument(
        "--skip", action="append", default=[], metavar="NAME", help="leave NAME out (repeatable)"
    )
    parser.add_argument(
        "--all",
        "--include-long",
        dest="all",
        action="store_true",
        help="also run the long benchmarks (a named one runs even when long)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="only regenerate benchmarks/README.md from the JSON results",
    )
    parser.add_argument(
        "--no-table",
        action="store_true",
        help="do not regenerate benchmarks/README.md after the run",
    )


def find_checkout(start: Path, *, fallback: Path | None = _PACKAGE_ROOT) -> Path:
    """The repository root holding `benchmarks/suite.py`: `start` or a folder above it, else
    `fallback` (by default the folder above this package: an editable install's checkout)."""
    for folder in (start, *start.parents, *([fallback] if fallback else [])):
        if (folder / _MARKER).is_file() and (folder / "pyproject.toml").is_file():
            return folder
    raise BenchmarksNotFoundError(
        f"fedllm bench needs a fedllm checkout (benchmarks/ is not installed with the "
        f"package): no {_MARKER} in {start} or above; run it from a clone of the repository."
    )


def _argv(args: argparse.Namespace) -> list[str]:
    argv = list(args.names)
    argv += [f for f, on in (("--list", args.list), ("--all", args.all)) if on]
    argv += [f for f, on in (("--table", args.table), ("--no-table", args.no_table)) if on]
    for name in args.skip:
        argv += ["--skip", name]
    return argv


def cmd_bench(args: argparse.Namespace) -> int:
    root = find_checkout(Path.cwd().resolve())
    return subprocess.run([sys.executable, "-m", "benchmarks", *_argv(args)], cwd=root).returncode


def add_parsers(sub: Any) -> None:
    """`bench`."""
    bench = sub.add_parser(
        "bench", help="run the benchmark suite of a checkout (benchmarks/), or list it"
    )
    add_suite_arguments(bench)
    bench.set_defaults(func=cmd_bench)
