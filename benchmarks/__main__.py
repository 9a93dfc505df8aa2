"""`python -m benchmarks [NAME ...]`: run the benchmark suite (see benchmarks/suite.py).

`fedllm bench` runs this same entry point from a checkout; the flags are defined once, in
`fedllm.cli.bench.add_suite_arguments`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from benchmarks.runner import failures, list_lines, run_suite, select, summary_lines
from benchmarks.suite import BENCH_DIR, BENCHMARKS, RESULTS_DIR, Benchmark
from benchmarks.table import README, write_readme
from fedllm.cli.bench import add_suite_arguments

__all__ = ["main"]


def main(
    argv: Sequence[str] | None = None,
    *,
    registry: Sequence[Benchmark] = BENCHMARKS,
    bench_dir: Path = BENCH_DIR,
    results_dir: Path = RESULTS_DIR,
    readme: Path = README,
    out: TextIO = sys.stdout,
) -> int:
    """Exit status 0 when every selected benchmark passed, 1 when one failed, 2 on bad use.

    `registry`, the folders and `readme` can be replaced (tests run a registry of tiny
    scripts into a temporary folder).
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    add_suite_arguments(parser)
    args = parser.parse_args(argv)
    names = list(args.names)
    if names == ["table"] and "table" not in {b.name for b in registry}:
        names, args.table = [], True
    if args.list:
        out.write("\n".join(list_lines(registry, bench_dir)) + "\n")
        return 0
    if args.table:
        out.write(f"wrote {write_readme(registry, results_dir, readme)}\n")
        return 0
    try:
        chosen, left = select(registry, names, skip=args.skip, include_long=args.all)
    except ValueError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2
    outcomes = run_suite(
        chosen, left, named=bool(names), bench_dir=bench_dir, results_dir=results_dir, out=out
    )
    out.write("\n" + "\n".join(summary_lines(outcomes)) + "\n")
    if not args.no_table:
        out.write(f"wrote {write_readme(registry, results_dir, readme)}\n")
    failed = failures(outcomes)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
