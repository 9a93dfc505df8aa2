"""Load instruction data from any supported source into one shape.

Every source (the embedded chatterbot corpus, a local JSONL/JSON/CSV file, a directory written by
``Dataset.save_to_disk``, or a Hugging Face hub id) is normalised to a ``datasets.Dataset`` with
the string columns ``prompt``, ``response`` and ``category``. Errors a user can fix are
:class:`~fedllm.errors.DataError` with a one-sentence message.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import pathlib
from collections.abc import Mapping, Sequence

import datasets
import yaml

from fedllm.errors import DataError

__all__ = [
    "COLUMNS",
    "DEFAULT_CATEGORY",
    "EMBEDDED_SOURCE",
    "first_line",
    "load_examples",
    "load_site_examples",
]

log = logging.getLogger(__name__)

EMBEDDED_SOURCE = "chatterbot"
"""``data.source`` value that selects the chatterbot corpus shipped with ``chatterbot-corpus``."""

COLUMNS = ("prompt", "response", "category")
"""The columns of every dataset :func:`load_examples` returns, in this order."""

DEFAULT_CATEGORY = "all"
"""Category given to examples whose source has no category column."""

_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# libyaml's loader is the same safe loader as ``yaml.safe_load`` (no arbitrary Python objects),
# about 6x faster on the corpus; fall back to the pure-Python one when libyaml is absent.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_examples(
    source: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = "category",
    split: str = "train",
) -> datasets.Dataset:
    """Load (prompt, response, category) examples from any supported source.

    Parameters
    ----------
    source : str
        ``"chatterbot"`` for the embedded corpus; a path to a ``.jsonl``, ``.json`` or ``.csv``
        file; a directory written by ``Dataset.save_to_disk``; otherwise a Hugging Face hub
        dataset id (which needs the network or a warm cache).
    prompt_field : str (default: "prompt")
        Column holding the user's message. Ignored for the embedded corpus and for chat-style
        files that have a ``messages`` column instead.
    response_field : str (default: "response")
        Column holding the answer to learn.
    category_field : str | None (default: "category")
        Column holding the topic, which the ``by-category`` partitioner uses to give each site
        different topics. ``None`` (or a column the source lacks) puts every example in
        category ``"all"``.
    split : str (default: "train")
        Split to read from a hub dataset or a saved ``DatasetDict``.

    Returns
    -------
    datasets.Dataset
        Exactly the string columns ``prompt``, ``response`` and ``category``, in source order.
        Rows whose prompt or response is missing or blank are dropped (and counted in the log).

    Raises
    ------
    DataError
        If the source does not exist or cannot be read, lacks a prompt or response column, or
        yields no examples. The message names the source and what would fix it.
    """
    source = source.strip()
    category_field = category_field or None
    if source == EMBEDDED_SOURCE:
        return _load_chatterbot()

    path = pathlib.Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raw = _load_saved_dir(path, split=split)
    elif suffix in _FILE_LOADERS:
        raw = _load_file(path, loader=_FILE_LOADERS[suffix])
    elif path.exists():
        raise DataError(
            f"Data file '{source}' has an unsupported type '{suffix or '(none)'}'; "
            f"convert it to one of {', '.join(sorted(_FILE_LOADERS))}."
        )
    elif source.startswith((".", "/", "~")):
        raise DataError(
            f"Data path '{source}' does not exist; check data.source or create the file."
        )
    else:
        raw = _load_hub(source, split=split)

    if "messages" in raw.column_names and prompt_field not in raw.column_names:
        return _from_messages(raw, origin=source, category_field=category_field)
    return _from_columns(
        raw,
        origin=source,
        prompt_field=prompt_field,
        response_field=response_field,
        category_field=category_field,
    )


def load_site_examples(
    source: str,
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    category_field: str | None = "category",
) -> datasets.Dataset:
    """A site's own data (its node config `data`): what `load_examples` reads, or a folder
    of such files, all of them, in name order (a site that keeps one file per month, say).
    A bad file is named by the loader's one-line message."""
    files = site_files(source)
    if files is None:
        return load_examples(
            source,
            prompt_field=prompt_field,
            response_field=response_field,
            category_field=category_field,
        )
    parts = [
        load_examples(
            str(f),
            prompt_field=prompt_field,
            response_field=response_field,
            category_field=category_field,
        )
        for f in files
    ]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def site_files(source: str) -> list[pathlib.Path] | None:
    """The files of a folder holding one data file per site (natural sites, in simulation),
    sorted by name: site k reads the k-th. None when `source` is not such a folder (a file,
    a hub id, or a `save_to_disk` folder, which holds `.arrow` files)."""
    path = pathlib.Path(source.strip()).expanduser()
    if not path.is_dir() or any(path.glob("*.arrow")) or (path / "dataset_dict.json").exists():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _FILE_LOADERS)
    return files or None


def _chatterbot_dir() -> pathlib.Path:
    """Locate the English YAML files of the installed ``chatterbot-corpus`` without importing it.

    Importing the package is unnecessary (it is data only) and locating it this way keeps the
    read side-effect free.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The embedded data set needs the 'chatterbot-corpus' package; install it with "
            "'pip install chatterbot-corpus==1.3.3' or set data.source to your own data."
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def _load_chatterbot() -> datasets.Dataset:
    """Turn every consecutive pair of turns of every conversation into one example.

    Each YAML file is one topic (``ai``, ``food``, ...), which makes the file stem a natural
    category: sites that get different files really hold different kinds of conversation.
    Files are read in sorted order so the dataset (and every partition) is reproducible.
    """
    root = _chatterbot_dir()
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(
            f"No chatterbot YAML files were found in '{root}'; reinstall 'chatterbot-corpus'."
        )
    rows: dict[str, list[str]] = {name: [] for name in COLUMNS}
    skipped = 0
    for path in files:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_SAFE_LOADER) or {}
        for conversation in doc.get("conversations") or []:
            for first, second in itertools.pairwise(conversation):
                # YAML turns bare answers like "yes" into booleans: such turns are not text.
                if not (is_text(first) and is_text(second)):
                    skipped += 1
                    continue
                rows["prompt"].append(first.strip())
                rows["response"].append(second.strip())
                rows["category"].append(path.stem)
    n_topics = len(set(rows["category"]))
    log.info(
        "Loaded %d prompt/response pairs in %d topics from the embedded chatterbot corpus "
        "(%d pairs with a non-text turn skipped)",
        len(rows["prompt"]),
        n_topics,
        skipped,
    )
    if not rows["prompt"]:
        raise DataError(f"The chatterbot corpus in '{root}' has no usable conversation turns.")
    return datasets.Dataset.from_dict(rows)


def is_text(value: object) -> bool:
    """A string with something other than whitespace in it: what a prompt or answer must be."""
    return isinstance(value, str) and bool(value.strip())


def _load_file(path: pathlib.Path, *, loader: str) -> datasets.Dataset:
    """Read one local JSON Lines / JSON / CSV file with the ``datasets`` builders."""
    if not path.is_file():
        raise DataError(f"Data file '{path}' does not exist; check data.source or create it.")
    # ``datasets`` answers an empty JSON Lines file with a bare StopIteration: check first.
    if not path.read_bytes().strip():
        raise DataError(f"Data file '{path}' is empty; add at least two examples to it.")
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as e:  # any parser failure gets the same user-facing message
        raise DataError(
            f"Data file '{path}' could not be read as {loader.upper()} "
            f"({type(e).__name__}: {first_line(e)}); fix its format or its extension."
        ) from e


def _load_saved_dir(path: pathlib.Path, *, split: str) -> datasets.Dataset:
    """Read a directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # any failure means the same thing to the user
        raise DataError(
            f"Directory '{path}' is not a dataset saved with Dataset.save_to_disk "
            f"({type(e).__name__}); point data.source at such a directory or at a data file."
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"Saved dataset '{path}' has no split '{split}' (splits: "
                f"{', '.join(sorted(loaded))}); choose one of them."
            )
        return loaded[split]
    return loaded


def _load_hub(dataset_id: str, *, split: str) -> datasets.Dataset:
    """Load one split of a Hugging Face hub dataset, turning every failure into a DataError."""
    try:
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, auth, missing split: one clear message
        raise DataError(
            f"Hugging Face dataset '{dataset_id}' (split '{split}') could not be loaded "
            f"({type(e).__name__}: {first_line(e)}); check the id and split, connect to the "
            "hub once to cache it, or set data.source to a local file."
        ) from e
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(
            f"Hugging Face dataset '{dataset_id}' split '{split}' is not a plain table; "
            "set data.source to a local file instead."
        )
    return loaded


def first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else "no details"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _as_text(value: object) -> str | None:
    """Return ``value`` as stripped text, or ``None`` if it is missing, blank or not scalar.

    CSV and JSON readers may give numbers (``3``) for answer cells: those are still text to
    learn, whereas lists, dicts and nulls are not.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip()


def _finish(rows: dict[str, list[str]], *, origin: str, dropped: int) -> datasets.Dataset:
    if dropped:
        log.warning(
            "Dropped %d rows of '%s' with a missing or blank prompt/response", dropped, origin
        )
    if not rows["prompt"]:
        raise DataError(
            f"Data source '{origin}' has no usable examples (every row lacks a prompt or a "
            "response); add examples or check data.prompt-field and data.response-field."
        )
    log.info(
        "Loaded %d examples in %d categories from '%s'",
        len(rows["prompt"]),
        len(set(rows["category"])),
        origin,
    )
    return datasets.Dataset.from_dict(rows)


def _from_columns(
    raw: datasets.Dataset,
    *,
    origin: str,
    prompt_field: str,
    response_field: str,
    category_field: str | None,
) -> datasets.Dataset:
    """Rename the configured columns to ``prompt``/``response``/``category`` and clean values."""
    for field_key, column in (
        ("data.prompt-field", prompt_field),
        ("data.response-field", response_field),
    ):
        if column not in raw.column_names:
            raise DataError(
                f"Data source '{origin}' has no column '{column}' (columns: "
                f"{', '.join(raw.column_names) or 'none'}); set {field_key} to one of them."
            )
    if len(raw) == 0:
        raise DataError(f"Data source '{origin}' has no rows; add at least two examples.")
    has_category = category_field is not None and category_field in raw.column_names
    if category_field is not None and not has_category:
        log.info(
            "'%s' has no column '%s': every example is in category '%s'",
            origin,
            category_field,
            DEFAULT_CATEGORY,
        )
    prompts = raw[prompt_field]
    responses = raw[response_field]
    categories = raw[category_field] if has_category else [DEFAULT_CATEGORY] * len(raw)
    rows: dict[str, list[str]] = {name: [] for name in COLUMNS}
    dropped = 0
    for prompt, response, category in zip(prompts, responses, categories, strict=True):
        prompt_text, response_text = _as_text(prompt), _as_text(response)
        if prompt_text is None or response_text is None:
            dropped += 1
            continue
        rows["prompt"].append(prompt_text)
        rows["response"].append(response_text)
        rows["category"].append(_as_text(category) or DEFAULT_CATEGORY)
    return _finish(rows, origin=origin, dropped=dropped)


def _from_messages(
    raw: datasets.Dataset, *, origin: str, category_field: str | None
) -> datasets.Dataset:
    """Take the first user turn and the assistant turn right after it from chat-style rows.

    Chat exports (OpenAI/ShareGPT-like ``messages`` lists of ``{role, content}``) often open with
    a system turn; only the first user/assistant exchange becomes the example, so every row
    contributes at most one example and later turns cannot leak answers into prompts.
    """
    if len(raw) == 0:
        raise DataError(f"Data source '{origin}' has no rows; add at least two examples.")
    has_category = category_field is not None and category_field in raw.column_names
    categories = raw[category_field] if has_category else [DEFAULT_CATEGORY] * len(raw)
    rows: dict[str, list[str]] = {name: [] for name in COLUMNS}
    dropped = 0
    for messages, category in zip(raw["messages"], categories, strict=True):
        pair = _first_exchange(messages)
        if pair is None:
            dropped += 1
            continue
        rows["prompt"].append(pair[0])
        rows["response"].append(pair[1])
        rows["category"].append(_as_text(category) or DEFAULT_CATEGORY)
    return _finish(rows, origin=origin, dropped=dropped)


def _first_exchange(messages: object) -> tuple[str, str] | None:
    if not isinstance(messages, Sequence):
        return None
    turns = [m for m in messages if isinstance(m, Mapping)]
    for i, turn in enumerate(turns[:-1]):
        if turn.get("role") == "user" and turns[i + 1].get("role") == "assistant":
            prompt, response = _as_text(turn.get("content")), _as_text(turns[i + 1].get("content"))
            if prompt is not None and response is not None:
                return prompt, response
            return None
    return None
