"""The benchmark suite (benchmarks/suite.py, runner.py, table.py, `python -m benchmarks`,
`fedllm bench`): registry, selection, running each benchmark as its own process, the table."""

from __future__ import annotations

import io
import json
import re
import textwrap
from pathlib import Path

import pytest

from benchmarks.__main__ import main
from benchmarks.provenance import rotation
from benchmarks.runner import select
from benchmarks.suite import BENCH_DIR, BENCHMARKS, RESULTS_DIR, Benchmark
from benchmarks.table import render, rows
from fedllm.cli import main as fedllm_main
from fedllm.cli.bench import find_checkout
from fedllm.errors import BenchmarksNotFoundError


def _scripts_writing_results(bench_dir: Path) -> set[str]:
    """Scripts in `bench_dir` that open a `BenchmarkRun`, i.e. write a result."""
    return {
        p.name
        for p in bench_dir.glob("*.py")
        if p.name != "provenance.py" and re.search(r"\bBenchmarkRun\(", p.read_text())
    }


def _unregistered(bench_dir: Path, registry: tuple[Benchmark, ...]) -> set[str]:
    return _scripts_writing_results(bench_dir) - {b.script for b in registry}


def _bench(name: str, *, long: bool = False, script: str | None = None) -> Benchmark:
    return Benchmark(
        name=name,
        script=script or f"{name}.py",
        description=f"the {name} benchmark",
        results=(f"{name}.json",),
        headline=lambda d: [f"value {d['value']}"],
        long=long,
    )


def _write_script(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def test_every_script_that_writes_a_result_is_registered(tmp_path: Path) -> None:
    """A new benchmark script (one that opens a BenchmarkRun) must be added to the registry."""
    # Prepare: the checker itself flags an unregistered script
    _write_script(tmp_path, "fresh", "run = BenchmarkRun('fresh')\n")
    _write_script(tmp_path, "helper", "def f():\n    return 1\n")
    # Execute
    missing = _unregistered(BENCH_DIR, BENCHMARKS)
    # Assert
    assert _unregistered(tmp_path, BENCHMARKS) == {"fresh.py"}
    assert "dp_step.py" in _scripts_writing_results(BENCH_DIR)
    assert missing == set(), f"benchmarks/suite.py does not register {sorted(missing)}"
    assert len({b.name for b in BENCHMARKS}) == len(BENCHMARKS)


def test_list_names_each_benchmark_marks_the_long_ones_and_a_missing_script(
    tmp_path: Path,
) -> None:
    """--list: one line per benchmark, `long` where long, `not present` without its script."""
    # Prepare
    _write_script(tmp_path, "here", "print('hi')\n")
    registry = (_bench("here"), _bench("slow", long=True, script="here.py"), _bench("gone"))
    out = io.StringIO()
    # Execute
    code = main(["--list"], registry=registry, bench_dir=tmp_path, out=out)
    # Assert
    lines = out.getvalue().splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == ["here", "slow", "gone"]
    assert "long" not in lines[0] and " long " in lines[1]
    assert "not present" in lines[2] and "not present" not in lines[0]
    assert "the here benchmark" in lines[0]


def test_the_real_registry_lists_every_benchmark() -> None:
    """`python -m benchmarks --list` names every registered benchmark."""
    # Execute
    out = io.StringIO()
    main(["--list"], out=out)
    # Assert
    listed = [line.split()[0] for line in out.getvalue().splitlines()]
    assert listed == [b.name for b in BENCHMARKS]
    assert {"robustness", "scale", "userdp_scale"} <= {b.name for b in BENCHMARKS if b.long}


def test_selection_runs_names_given_skips_long_unless_asked_and_skip_wins() -> None:
    """No names: every short one; --all adds the long; a named long one runs; --skip wins."""
    # Prepare
    registry = (_bench("a"), _bench("b", long=True), _bench("c"))
    # Execute
    default, left = select(registry)
    everything, _ = select(registry, include_long=True)
    named, _ = select(registry, ["b"])
    skipped, skip_left = select(registry, skip=["a"], include_long=True)
    # Assert
    assert [b.name for b in default] == ["a", "c"]
    assert [(o.name, o.status.startswith("skipped (long")) for o in left] == [("b", True)]
    assert [b.name for b in everything] == ["a", "b", "c"]
    assert [b.name for b in named] == ["b"]
    assert [b.name for b in skipped] == ["b", "c"]
    assert [o.status for o in skip_left] == ["skipped (--skip)"]
    with pytest.raises(ValueError, match="unknown benchmark.*nope; known: a, b, c"):
        select(registry, ["nope"])


def test_a_failing_benchmark_gives_a_non_zero_exit_and_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each benchmark runs as its own process: one that crashes, and one that exits 0 without
    writing its result, both fail and are named; the next still runs; the table is rewritten."""
    # Prepare
    results = tmp_path / "results"
    results.mkdir()
    writer = f"""\
        import json, sys
        json.dump({{"value": 7, "provenance": {{}}}}, open({str(results)!r} + "/good.json", "w"))
    """
    _write_script(tmp_path, "crash", "raise RuntimeError('boom')\n")
    _write_script(tmp_path, "silent", "print('forgot to write')\n")
    _write_script(tmp_path, "good", writer)
    registry = (_bench("crash"), _bench("silent"), _bench("good"))
    readme = tmp_path / "README.md"
    out = io.StringIO()
    # Execute
    code = main(
        [], registry=registry, bench_dir=tmp_path, results_dir=results, readme=readme, out=out
    )
    # Assert
    text = out.getvalue()
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == ["benchmarks failed: crash, silent"]
    assert "[crash 00:00] RuntimeError: boom" in text  # streamed, prefixed with name and time
    table = text.split("\nbenchmark ", 1)[1].splitlines()[2:]  # after the header and rule
    summary = {line.split()[0]: line for line in table if line and not line.startswith("wrote")}
    assert "failed (exit 1)" in summary["crash"]
    assert "no result (silent.json not written)" in summary["silent"]
    assert re.search(r"good\s+ok\s+\d+\.\d\s+good\.json", summary["good"])
    assert "value 7" in readme.read_text()


def test_a_named_benchmark_whose_script_is_missing_fails_and_a_default_one_is_reported(
    tmp_path: Path,
) -> None:
    """A registered script not yet written: `not present`, a failure only when named."""
    # Prepare
    registry = (_bench("gone"),)
    kw = {"registry": registry, "bench_dir": tmp_path, "results_dir": tmp_path}
    # Execute
    named = main(["gone", "--no-table"], out=(named_out := io.StringIO()), **kw)
    default = main(["--no-table"], out=(default_out := io.StringIO()), **kw)
    # Assert
    assert named == 1 and "not present" in named_out.getvalue()
    assert default == 0 and "skipped (not present)" in default_out.getvalue()


def test_the_table_has_a_row_with_headline_figures_for_every_committed_result() -> None:
    """Every JSON in benchmarks/results/ gets a row whose headline figures were read."""
    # Prepare
    committed = sorted(p.name for p in RESULTS_DIR.glob("*.json"))
    # Execute
    table = rows(BENCHMARKS)
    text = render(BENCHMARKS)
    # Assert
    assert committed and len(table) == len(committed)
    for row, name in zip(table, committed, strict=True):
        assert f"(results/{name})" in row[1]
        assert not row[2].startswith("("), f"{name}: {row[2]}"
        assert re.fullmatch(r"[0-9a-f]{7}( \(tree differed\))?", row[4]), row[4]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row[5])
        assert "cores" in row[3]
    assert text.count("\n| ") == len(committed) + 2  # header, rule, one row each


def test_an_unregistered_result_file_still_gets_a_row(tmp_path: Path) -> None:
    """A JSON no entry claims is shown, saying it has no headline function."""
    # Prepare
    machine = {"cpu_model": "X", "cpu_cores": 4, "cpu_cores_usable": 2, "gpus": ["H200"]}
    prov = {
        "commit": "a" * 40,
        "dirty": False,
        "started": "2026-12-04T10:00:00",
        "machine": machine,
    }
    (tmp_path / "stray.json").write_text(json.dumps({"benchmark": "stray", "provenance": prov}))
    # Execute
    (row,) = rows((_bench("other"),), tmp_path)
    # Assert
    assert row[0] == "stray" and "not in the registry" in row[2]
    assert row[3] == "X, 2 of 4 cores, H200" and row[4] == "aaaaaaa" and row[5] == "2026-12-04"


def test_fedllm_bench_outside_a_checkout_says_so_in_one_line(tmp_path: Path) -> None:
    """The benchmarks are not installed with the package: outside a checkout, one line."""
    # Execute
    with pytest.raises(BenchmarksNotFoundError) as caught:
        find_checkout(tmp_path, fallback=None)
    # Assert
    assert "\n" not in str(caught.value) and "checkout" in str(caught.value)
    assert find_checkout(BENCH_DIR / "results") == BENCH_DIR.parent


def test_fedllm_bench_lists_the_suite_from_a_checkout(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """`fedllm bench --list` runs `python -m benchmarks --list` in the checkout."""
    # Prepare
    monkeypatch.chdir(RESULTS_DIR)
    # Execute
    code = fedllm_main(["bench", "--list"])
    # Assert
    listed = [line.split()[0] for line in capfd.readouterr().out.splitlines()]
    assert code == 0 and listed == [b.name for b in BENCHMARKS]


def test_rotation_orders_sides_forward_then_back() -> None:
    """`rotation` is A B B A for more sides: every side sits early and late alike."""
    # Execute
    order = [side for _, side in rotation(["p", "h", "f"], 3)]
    # Assert
    assert order == ["p", "h", "f", "f", "h", "p", "p", "h", "f"]


def test_the_headlines_of_benchmarks_without_a_committed_result_read_their_shape() -> None:
    """scale and update_encoding have no committed result yet: their headline functions read
    the shape their scripts write (a run per configuration, the targets)."""
    # Prepare
    registry = {b.name: b for b in BENCHMARKS}
    scale = {
        "runs": [
            {
                "sites": n,
                "streaming": s,
                "status": "completed",
                "peak_rss_mib": 900.0 + n / 10,
                "round_seconds": [4.0, 6.0],
            }
            for n in (100, 1000)
            for s in (True, False)
        ],
        "targets": {
            "memory_within_10_percent": True,
            "memory_1000_over_100_streaming": 1.09,
            "memory_1000_over_100_listed": 1.4,
        },
    }
    run = {"bytes_up_per_site_per_round": [737_280], "bytes_up_ratio_to_fp32": 0.5}
    encoding = {
        "runs": {"fp32": run, "fp16": run, "int8": run},
        "targets": {
            "int8_bytes_at_most_30pct_of_fp32": {"ratio": 0.26, "met": True},
            "int8_final_loss_within_1pct_of_fp32": {"ratio": 1.02, "met": False},
        },
    }
    # Execute
    scale_lines = registry["scale"].headline(scale)
    encoding_lines = registry["update_encoding"].headline(encoding)
    # Assert
    assert scale_lines[0].startswith("1,000 sites (completed): peak coordinator RSS 1000 MiB")
    assert "1.09x streaming (target ≤ 1.10x: met)" in scale_lines[1]
    assert "int8 26% (target ≤ 30%: met)" in encoding_lines[0]
    assert "1.020x fp32's (target within 1%: missed)" in encoding_lines[1]
