"""Run the suite: pick benchmarks from the registry, run each as its own process, summarise.

Each benchmark runs as a separate `python benchmarks/<script>` (clean memory, and one that
crashes does not stop the others), from the repository root, with its registry arguments.
Its output is streamed prefixed with its name and the elapsed time. A benchmark counts as
passed only if it exits 0 and rewrote every result file the registry lists for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from benchmarks.suite import BENCH_DIR, RESULTS_DIR, Benchmark

ROOT = BENCH_DIR.parent

__all__ = ["Outcome", "failures", "list_lines", "run_one", "run_suite", "select", "summary_lines"]


@dataclass(frozen=True)
class Outcome:
    """What became of one benchmark in this invocation."""

    name: str
    status: str  # ok | failed (exit N) | no result | not present | skipped (...)
    seconds: float | None
    results: tuple[str, ...]

    @property
    def failed(self) -> bool:
        return not (self.status == "ok" or self.status.startswith("skipped"))


def select(
    registry: Sequence[Benchmark],
    names: Sequence[str] = (),
    *,
    skip: Sequence[str] = (),
    include_long: bool = False,
) -> tuple[list[Benchmark], list[Outcome]]:
    """The benchmarks to run (registry order) and those left out, each with its reason.

    Named benchmarks run even when long; without names every benchmark that is not long
    runs, and the long ones too with `include_long`. `skip` always wins.
    """
    known = [b.name for b in registry]
    unknown = [n for n in [*names, *skip] if n not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}.")
    chosen: list[Benchmark] = []
    left: list[Outcome] = []
    for bench in registry:
        if bench.name in skip:
            reason = "skipped (--skip)"
        elif names and bench.name not in names:
            continue  # not asked for: not part of this invocation at all
        elif not names and bench.long and not include_long:
            reason = "skipped (long; name it or pass --all)"
        else:
            chosen.append(bench)
            continue
        left.append(Outcome(bench.name, reason, None, bench.results))
    return chosen, left


def list_lines(registry: Sequence[Benchmark], bench_dir: Path = BENCH_DIR) -> list[str]:
    """`--list`: name, long or not, expected minutes, whether its script is here, description."""
    width = max(len(b.name) for b in registry)
    lines = []
    for b in registry:
        kind = "long" if b.long else "    "
        minutes = f"~{b.minutes:g} min" if b.minutes is not None else "   ? min"
        here = "" if b.present(bench_dir) else f"  [not present: {b.script} missing]"
        lines.append(f"{b.name:<{width}}  {kind}  {minutes:>8}  {b.description}{here}")
    return lines


def _stream(proc: subprocess.Popen[str], name: str, t0: float, out: TextIO) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        elapsed = int(time.monotonic() - t0)
        out.write(f"[{name} {elapsed // 60:02d}:{elapsed % 60:02d}] {line.rstrip()}\n")
        out.flush()


def run_one(
    bench: Benchmark,
    *,
    bench_dir: Path = BENCH_DIR,
    results_dir: Path = RESULTS_DIR,
    out: TextIO = sys.stdout,
) -> Outcome:
    """Run one benchmark as its own process and judge it by its exit and its result files."""
    script = bench.script_path(bench_dir)
    if not script.is_file():
        return Outcome(bench.name, "not present", None, bench.results)
    started = time.time()
    t0 = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), *bench.args],
        cwd=ROOT,  # the scripts' relative default --out paths are relative to the root
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    _stream(proc, bench.name, t0, out)
    code = proc.wait()
    seconds = round(time.monotonic() - t0, 1)
    if code != 0:
        return Outcome(bench.name, f"failed (exit {code})", seconds, bench.results)
    stale = [
        r
        for r in bench.results
        if not (results_dir / r).is_file() or (results_dir / r).stat().st_mtime < started - 1
    ]
    status = f"no result ({', '.join(stale)} not written)" if stale else "ok"
    return Outcome(bench.name, status, seconds, bench.results)


def summary_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """The closing table: name, status, seconds, result file(s)."""
    rows = [("benchmark", "status", "seconds", "result")]
    for o in outcomes:
        seconds = "" if o.seconds is None else f"{o.seconds:.1f}"
        rows.append((o.name, o.status, seconds, ", ".join(o.results)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def failures(outcomes: Sequence[Outcome]) -> list[str]:
    return [o.name for o in outcomes if o.failed]


def run_suite(
    chosen: Sequence[Benchmark],
    left: Sequence[Outcome] = (),
    *,
    named: bool = False,
    bench_dir: Path = BENCH_DIR,
    results_dir: Path = RESULTS_DIR,
    out: TextIO = sys.stdout,
) -> list[Outcome]:
    """Run `chosen` one after another; a benchmark whose script is missing fails only when
    it was named (a default run reports it and goes on)."""
    outcomes: list[Outcome] = []
    for i, bench in enumerate(chosen, start=1):
        out.write(f"== [{i}/{len(chosen)}] {bench.name}: {bench.description}\n")
        out.flush()
        outcome = run_one(bench, bench_dir=bench_dir, results_dir=results_dir, out=out)
        if outcome.status == "not present" and not named:
            outcome = Outcome(bench.name, "skipped (not present)", None, bench.results)
        seconds = "" if outcome.seconds is None else f" in {outcome.seconds:.1f} s"
        written = ", ".join(str(results_dir / r) for r in bench.results)
        out.write(f"== [{i}/{len(chosen)}] {bench.name}: {outcome.status}{seconds} -> {written}\n")
        out.flush()
        outcomes.append(outcome)
    return [*outcomes, *left]
