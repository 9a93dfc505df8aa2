"""What a site would train on, shown before it joins a federation (`fedllm data check`).

A site points fedllm at its own records (node config `data`); before its first round it
should see what fedllm makes of them: how many records are usable and which lines are not
(by file and line number), the train / held-out split, the token lengths under the model's
chat template, duplicates, and one example as the model will see it. Nothing leaves the
machine and nothing is written.
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.data.sources import is_text, load_site_examples
from fedllm.data.tokenize import split_train_eval, tokenize_examples
from fedllm.errors import DataError

__all__ = ["DataReport", "bad_lines", "check_data"]


def _jsonl_problems(path: Path, prompt: str, response: str) -> list[str]:
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                out.append(f"{path}:{n}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                out.append(f"{path}:{n}: a JSON {type(row).__name__}, not an object")
            elif "messages" in row and prompt not in row:
                turns = row["messages"]
                roles = [t.get("role") for t in turns] if isinstance(turns, list) else []
                if not all(isinstance(t, dict) for t in turns or [None]) or not (
                    "user" in roles and "assistant" in roles
                ):
                    out.append(f"{path}:{n}: 'messages' has no user turn and assistant turn")
            else:
                missing = [k for k in (prompt, response) if not is_text(row.get(k))]
                if missing:
                    out.append(f"{path}:{n}: no text in {', '.join(repr(k) for k in missing)}")
    return out


def _csv_problems(path: Path, prompt: str, response: str) -> list[str]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        absent = [k for k in (prompt, response) if k not in header]
        if absent:
            return [f"{path}:1: the header has no column {', '.join(repr(k) for k in absent)}"]
        out = []
        for row in reader:
            missing = [k for k in (prompt, response) if not is_text(row.get(k))]
            if missing:
                where = f"{path}:{reader.line_num}"
                out.append(f"{where}: no text in {', '.join(repr(k) for k in missing)}")
    return out


def bad_lines(path: str | Path, *, prompt_field: str, response_field: str) -> list[str]:
    """Every line of a JSONL or CSV file that yields no example, as `file:line: why`. A JSON
    file or a saved dataset folder is not line-oriented: only the loader's count applies."""
    path = Path(path).expanduser()
    if not path.exists():  # the loader names it
        return []
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            out += _jsonl_problems(f, prompt_field, response_field)
        elif f.suffix.lower() == ".csv":
            out += _csv_problems(f, prompt_field, response_field)
    return out


@dataclass
class DataReport:
    """What `check_data` found; `lines()` is what the CLI prints."""

    source: str
    records: int
    train: int
    held_out: int
    lengths: list[int]
    max_length: int
    duplicates: int
    example: str
    problems: list[str] = field(default_factory=list)
    load_error: str = ""  # why nothing could be loaded (the bad lines say where)

    def lines(self) -> list[str]:
        if self.load_error:
            return [
                f"data check: {self.source}",
                f"  records: none loadable: {self.load_error}",
                "  bad lines:",
                *("    " + p for p in self.problems),
            ]
        q = statistics.quantiles(self.lengths, n=20) if len(self.lengths) > 1 else self.lengths
        longer = sum(n > self.max_length for n in self.lengths)
        out = [
            f"data check: {self.source}",
            f"  records: {self.records} usable, {len(self.problems)} bad lines",
            f"  split: {self.train} train, {self.held_out} held-out (made at the site)",
            f"  tokens: min {min(self.lengths)}, median {int(statistics.median(self.lengths))}, "
            f"95th percentile {int(q[-1])}, max {max(self.lengths)}; {longer} longer than "
            f"data.max-length = {self.max_length} (cut)",
            f"  duplicates: {self.duplicates} records repeat an earlier (prompt, response)",
            "  one example as the model sees it:",
            *("    " + line for line in self.example.splitlines()),
        ]
        if self.problems:
            out += ["  bad lines:", *("    " + p for p in self.problems)]
        return out


def check_data(
    source: str,
    tokenizer: Any,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = None,
    eval_fraction: float = 0.1,
    max_eval_examples: int = 64,
    seed: int = 0,
    max_length: int = 128,
) -> DataReport:
    """Load `source` as a site would and report on it (see the module docstring).

    Raises
    ------
    DataError
        If nothing usable is found and no line is to blame (the loader's one-line message
        names the source).
    """
    problems = (
        []
        if source == "chatterbot"
        else bad_lines(source, prompt_field=prompt_field, response_field=response_field)
    )
    try:
        examples = load_site_examples(
            source,
            prompt_field=prompt_field,
            response_field=response_field,
            category_field=category_field,
        )
    except DataError as e:
        if not problems:
            raise
        # A malformed line stops the whole file loading (as it would at the site): name
        # every bad line rather than the first error alone.
        return DataReport(source, 0, 0, 0, [], max_length, 0, "", problems, load_error=str(e))
    train, held_out = split_train_eval(
        examples, eval_fraction=eval_fraction, max_eval_examples=max_eval_examples, seed=seed
    )
    features = tokenize_examples(examples, tokenizer, max_length=1_000_000)
    pairs = list(zip(examples["prompt"], examples["response"], strict=True))
    first = examples[0]
    chat = [
        {"role": "user", "content": first["prompt"]},
        {"role": "assistant", "content": first["response"]},
    ]
    try:
        example = str(tokenizer.apply_chat_template(chat, tokenize=False))
    except (ValueError, AttributeError):  # no chat template: the plain format is used
        example = tokenizer.decode(features[0]["input_ids"])
    return DataReport(
        source=source,
        records=len(examples),
        train=len(train),
        held_out=len(held_out),
        lengths=[len(f["input_ids"]) for f in features],
        max_length=max_length,
        duplicates=len(pairs) - len(set(pairs)),
        example=example,
        problems=problems,
    )
