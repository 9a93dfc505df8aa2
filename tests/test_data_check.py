"""`fedllm data check`: a site sees what it would train on, and every bad line by number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main as cli


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(i: int) -> str:
    return json.dumps({"prompt": f"What is {i} plus one?", "response": f"It is {i + 1}."})


def test_a_clean_file_is_described_and_passes(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _jsonl(tmp_path / "site.jsonl", [_row(i) for i in range(30)] + [_row(3)])
    code = cli(["data", "check", str(path), "--model", str(tiny_model_dir), "--max-eval", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "records: 31 usable, 0 bad lines" in out
    # Held out by hash (u < 0.1 under seed 0): 1 of these 31 records.
    assert "split: 30 train, 1 held-out" in out
    assert "duplicates: 1 records repeat" in out
    assert "What is 0 plus one?" in out and "It is 1." in out  # the rendered example
    assert "tokens: min" in out and "longer than data.max-length = 128" in out


def test_every_bad_line_is_named_by_file_and_line_and_the_check_fails(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [_row(0), "{not json", _row(1), json.dumps({"prompt": "hi"}), "[1, 2]", _row(2)]
    path = _jsonl(tmp_path / "site.jsonl", lines)
    code = cli(["data", "check", str(path), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{path}:2: not JSON" in out
    assert f"{path}:4: no text in 'response'" in out
    assert f"{path}:5: a JSON list, not an object" in out
    assert "records: none loadable" in out  # one bad line stops the file, at the site too


def test_a_csv_without_the_mapped_columns_is_named_at_its_header(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "site.csv"
    path.write_text("question,answer\n" + "".join(f'"q{i}","a{i}"\n' for i in range(5)))
    code = cli(["data", "check", str(path), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert code == 1 and f"{path}:1: the header has no column 'prompt', 'response'" in out
    ok = cli(
        [
            "data", "check", str(path), "--model", str(tiny_model_dir),
            "--prompt-field", "question", "--response-field", "answer",
        ]
    )  # fmt: skip
    assert ok == 0 and "records: 5 usable, 0 bad lines" in capsys.readouterr().out


def test_a_missing_path_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(["data", "check", str(tmp_path / "absent.jsonl"), "--model", str(tiny_model_dir)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fedllm: error:") and "absent.jsonl" in last
