"""A benchmark result says which one run made it, and never silently mixes in another's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.provenance import PROVENANCE_FILE, BenchmarkRun, abba, source_state

ROOT = Path(__file__).resolve().parents[1]


def test_paired_runs_alternate_a_b_b_a() -> None:
    assert [side for _, side in abba(3)] == list("ABBAAB")
    assert [pair for pair, _ in abba(2)] == [0, 0, 1, 1]


def test_a_result_carries_its_exact_command_commit_machine_and_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks/x.py", "--rounds", "2", "--name", "a b"])
    run = BenchmarkRun("x")
    out = run.write(tmp_path / "x.json", {"figure": 1.5})
    assert json.loads((tmp_path / "x.json").read_text()) == out
    prov = out["provenance"]
    assert prov["command"].endswith("benchmarks/x.py --rounds 2 --name 'a b'")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert prov["commit"] == (head or None)
    assert isinstance(prov["dirty"], bool | None)
    assert prov["started"] <= prov["finished"]
    machine = prov["machine"]
    assert machine["cpu_cores"] >= 1 and machine["memory_gib"] > 0
    assert machine["cpu_model"] and machine["versions"]["torch"].startswith("2.13.0")
    assert out["figure"] == 1.5 and out["benchmark"] == "x"


def test_a_dirty_tree_is_flagged_with_the_files_that_differ(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "f.py").write_text("1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    assert source_state(repo)["dirty"] is False
    (repo / "f.py").write_text("2\n")
    state = source_state(repo)
    assert state["dirty"] is True and state["changed_files"] == ["f.py"]


def test_an_artefact_from_an_earlier_run_is_refused_without_reuse(tmp_path: Path) -> None:
    earlier = BenchmarkRun("x")
    artefact = tmp_path / "runs" / "record-dp"
    artefact.mkdir(parents=True)
    earlier.mark_made(artefact)
    later = BenchmarkRun("x")
    with pytest.raises(SystemExit, match=r"record-dp already exists; pass --reuse"):
        later.reuse(artefact)
    assert later.reuse(tmp_path / "runs" / "record-nodp") is False  # nothing there: make it


def test_a_reused_artefact_is_named_with_the_run_that_made_it(tmp_path: Path) -> None:
    artefact = tmp_path / "model"
    artefact.mkdir()
    BenchmarkRun("maker").mark_made(artefact)
    later = BenchmarkRun("x", allow_reuse=True)
    assert later.reuse(artefact) is True
    reused = later.write(tmp_path / "x.json", {})["provenance"]["artefacts_reused"]
    assert reused == [
        {"artefact": str(artefact), "made_by": json.loads((artefact / PROVENANCE_FILE).read_text())}
    ]
    assert reused[0]["made_by"]["benchmark"] == "maker"


def test_an_artefact_no_run_vouches_for_is_refused_even_with_reuse(tmp_path: Path) -> None:
    crashed = tmp_path / "runs" / "he-0"
    crashed.mkdir(parents=True)
    (crashed / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=rf"he-0 has no {PROVENANCE_FILE}"):
        BenchmarkRun("x", allow_reuse=True).reuse(crashed)
