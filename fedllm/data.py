"""Load instruction data, split it across sites, and turn it into chat-formatted training ids.

Every source (the embedded chatterbot corpus, a local JSONL/JSON/CSV file, a directory written by
``Dataset.save_to_disk``, or a Hugging Face hub id) is normalised to one shape: a
``datasets.Dataset`` with the string columns ``prompt``, ``response`` and ``category``. Sites are
carved out of it with flwr-datasets partitioners, so the non-IID splits are the ones the Flower
community uses. Tokenisation goes through the model's own chat template and puts the loss on the
answer only: the prompt and the padding are labelled ``-100``.

Nothing here imports Flower itself; errors a user can fix are :class:`~fedllm.errors.DataError`
or :class:`~fedllm.errors.ConfigError` with a one-sentence message.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import pathlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import torch
import yaml
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedllm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "COLUMNS",
    "DEFAULT_CATEGORY",
    "EMBEDDED_SOURCE",
    "IGNORE_INDEX",
    "PARTITION_SCHEMES",
    "collate_batch",
    "load_examples",
    "partition_examples",
    "split_train_eval",
    "tokenize_examples",
]

log = logging.getLogger(__name__)

EMBEDDED_SOURCE = "chatterbot"
"""``data.source`` value that selects the chatterbot corpus shipped with ``chatterbot-corpus``."""

COLUMNS = ("prompt", "response", "category")
"""The columns of every dataset :func:`load_examples` returns, in this order."""

DEFAULT_CATEGORY = "all"
"""Category given to examples whose source has no category column."""

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and ``transformers``' causal-LM loss) skips."""

PARTITION_SCHEMES = ("by-category", "dirichlet", "iid")
"""Names accepted by :func:`partition_examples` (config key ``data.partitioner``)."""

_FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv"}
# libyaml's loader is the same safe loader as ``yaml.safe_load`` (no arbitrary Python objects),
# about 6x faster on the corpus; fall back to the pure-Python one when libyaml is absent.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_CHAT_BATCH = 256
# Private name, so a source that already has a "site" column is not clobbered.
_SITE_COLUMN = "_fedllm_site"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


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
                if not (_is_text(first) and _is_text(second)):
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


def _is_text(value: object) -> bool:
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
            f"({type(e).__name__}: {_first_line(e)}); fix its format or its extension."
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
            f"({type(e).__name__}: {_first_line(e)}); check the id and split, connect to the "
            "hub once to cache it, or set data.source to a local file."
        ) from e
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(
            f"Hugging Face dataset '{dataset_id}' split '{split}' is not a plain table; "
            "set data.source to a local file instead."
        )
    return loaded


def _first_line(error: BaseException, limit: int = 160) -> str:
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


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def partition_examples(
    ds: datasets.Dataset,
    *,
    num_sites: int,
    scheme: str = "by-category",
    seed: int = 0,
    alpha: float = 0.5,
) -> list[datasets.Dataset]:
    """Split examples into one dataset per site with a flwr-datasets partitioner.

    Parameters
    ----------
    ds : datasets.Dataset
        Output of :func:`load_examples` (needs a ``category`` column except for ``iid``).
    num_sites : int
        Number of sites (Flower partitions) to produce.
    scheme : str (default: "by-category")
        ``"by-category"``: whole categories go to sites, so sites hold different topics (the
        realistic non-IID case: hospitals, departments). Categories are packed greedily,
        largest first, into the site with the fewest examples so far, which balances sizes as
        far as whole topics allow. ``"iid"``: a seeded shuffle cut into equal shards.
        ``"dirichlet"``: per-category shares drawn from Dir(``alpha``) (Hsu et al. 2019,
        arXiv 1909.06335).
    seed : int (default: 0)
        Seed for the ``iid`` shuffle and the Dirichlet draws.
    alpha : float (default: 0.5)
        Dirichlet concentration: small values give each site few categories.

    Returns
    -------
    list[datasets.Dataset]
        ``num_sites`` non-empty datasets with the columns of ``ds``; index ``i`` is site ``i``.

    Raises
    ------
    ConfigError
        If ``scheme`` is unknown or ``num_sites`` is below 1.
    DataError
        If the data cannot fill every site (too few categories or examples).
    """
    scheme = scheme.strip().lower()
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"data.partitioner = '{scheme}' is not a known partitioner; use one of "
            f"{', '.join(PARTITION_SCHEMES)}."
        )
    if num_sites < 1:
        raise ConfigError(f"The number of sites must be at least 1, got {num_sites}.")
    if len(ds) < num_sites:
        raise DataError(
            f"{len(ds)} examples cannot fill {num_sites} sites; use fewer sites or more data."
        )

    partitioner: Partitioner
    if scheme == "by-category":
        ds, partitioner = _by_category(ds, num_sites=num_sites)
    elif scheme == "iid":
        # IidPartitioner cuts contiguous shards, and sources are usually ordered by topic:
        # shuffle first, or "iid" sites would each get a few topics.
        ds = ds.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_sites)
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_sites,
            partition_by="category",
            alpha=alpha,
            # Two examples is the least a site can split into train and eval; ask for more when
            # the data allows, so no site ends up with a handful of examples.
            min_partition_size=max(2, min(10, len(ds) // (4 * num_sites))),
            seed=seed,
        )
    partitioner.dataset = ds
    try:
        sites = [partitioner.load_partition(i) for i in range(num_sites)]
    except ValueError as e:
        raise DataError(
            f"The {scheme} partitioner could not split {len(ds)} examples into {num_sites} "
            f"sites ({_first_line(e)}); use fewer sites, more data or a larger "
            "data.dirichlet-alpha."
        ) from e
    if scheme == "by-category":
        sites = [site.remove_columns(_SITE_COLUMN) for site in sites]
    for index, site in enumerate(sites):
        if len(site) == 0:
            raise DataError(
                f"Site {index} received no examples from the {scheme} partitioner; use fewer "
                "sites or more data."
            )
    log.info(
        "Partitioned %d examples into %d sites (%s): sizes %s",
        len(ds),
        num_sites,
        scheme,
        [len(site) for site in sites],
    )
    return sites


def _by_category(
    ds: datasets.Dataset, *, num_sites: int
) -> tuple[datasets.Dataset, NaturalIdPartitioner]:
    """Assign whole categories to sites and return the data with a site-id column."""
    counts = Counter(ds["category"])
    if len(counts) < num_sites:
        raise DataError(
            f"Only {len(counts)} categories ({', '.join(sorted(counts))}) for {num_sites} sites: "
            "by-category needs at least one category per site; use fewer sites, the iid or "
            "dirichlet partitioner, or a data.category-field with more values."
        )
    loads = [0] * num_sites
    site_of: dict[str, int] = {}
    # Largest first into the emptiest site (ties: lower site index, then category name) is the
    # LPT heuristic: deterministic, and within 4/3 of the best possible largest site.
    for category, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        target = min(range(num_sites), key=lambda i: (loads[i], i))
        site_of[category] = target
        loads[target] += count
    for site in range(num_sites):
        topics = sorted(c for c, s in site_of.items() if s == site)
        log.debug("Site %d: %d examples in %s", site, loads[site], ", ".join(topics))
    with_site = ds.add_column(_SITE_COLUMN, [site_of[c] for c in ds["category"]])
    # Site ids are 0..num_sites-1 and NaturalIdPartitioner numbers sorted ids from 0, so
    # partition i is exactly site i.
    return with_site, NaturalIdPartitioner(partition_by=_SITE_COLUMN)


def split_train_eval(
    ds: datasets.Dataset, *, eval_fraction: float, max_eval_examples: int, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a bounded, reproducible evaluation set from one site's examples.

    Parameters
    ----------
    ds : datasets.Dataset
        One site's examples.
    eval_fraction : float
        Share of the examples to hold out, in (0, 1).
    max_eval_examples : int
        Cap on the held-out set: evaluating every held-out example each round is what made
        rounds slow on CPU, so the cost stays bounded however large the site is.
    seed : int
        Seed of the shuffle; the same seed always gives the same split.

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        ``(train, eval)``: disjoint, together all of ``ds``; ``eval`` has
        ``min(max(1, round(n * eval_fraction)), max_eval_examples)`` rows and ``train`` at
        least one.

    Raises
    ------
    ConfigError
        If ``eval_fraction`` is outside (0, 1) or ``max_eval_examples`` is negative.
    DataError
        If the site has fewer than two examples.
    """
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"data.eval-fraction = {eval_fraction} must be in (0, 1).")
    if max_eval_examples < 0:
        raise ConfigError(f"The eval example cap must be >= 0, got {max_eval_examples}.")
    n = len(ds)
    if n < 2:
        raise DataError(
            f"A site with {n} example(s) cannot be split into training and evaluation sets; "
            "give each site at least two examples (fewer sites or more data)."
        )
    n_eval = min(max(1, round(n * eval_fraction)), max_eval_examples, n - 1)
    shuffled = ds.shuffle(seed=seed)
    eval_ds = shuffled.select(range(n_eval))
    train_ds = shuffled.select(range(n_eval, n))
    return train_ds, eval_ds


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


def tokenize_examples(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> list[dict[str, list[int]]]:
    r"""Render each example with the model's chat template and label only the answer.

    Parameters
    ----------
    ds : datasets.Dataset
        Examples with ``prompt`` and ``response`` columns.
    tokenizer : transformers.PreTrainedTokenizerBase
        The base model's tokenizer. Its chat template is used so fine-tuning sees exactly the
        format the instruct model is prompted with; without one, a plain
        ``"User: ...\nAssistant: ..."`` format plus EOS is used (with a warning).
    max_length : int
        Longest sequence kept. Longer examples are cut at the end (keeping at least one answer
        token); examples whose prompt alone fills ``max_length`` are dropped, since they would
        carry no answer to learn.

    Returns
    -------
    list[dict[str, list[int]]]
        One ``{"input_ids", "labels"}`` pair of equal-length int lists per kept example, with
        ``labels`` equal to ``input_ids`` on the answer and ``-100`` on the prompt.
    """
    if max_length < 2:
        raise ConfigError(f"data.max-length = {max_length} must be at least 2.")
    prompts, responses = ds["prompt"], ds["response"]
    if getattr(tokenizer, "chat_template", None):
        prompt_ids, full_ids = _chat_template_ids(tokenizer, prompts, responses)
    else:
        log.warning(
            "Tokenizer has no chat template: using a plain 'User: ...\\nAssistant: ...' format; "
            "prefer an instruct model's tokenizer"
        )
        prompt_ids, full_ids = _plain_format_ids(tokenizer, prompts, responses)

    features: list[dict[str, list[int]]] = []
    too_long = misaligned = 0
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        boundary = len(prompt)
        if full[:boundary] != prompt:
            # Some tokenizers merge the last prompt token with the first answer token: mask the
            # shared prefix only, so no prompt token is ever a label.
            boundary = _common_prefix(prompt, full)
            misaligned += 1
        if boundary >= max_length or boundary >= len(full):
            too_long += 1
            continue
        input_ids = list(full[:max_length])
        labels = [IGNORE_INDEX] * boundary + input_ids[boundary:]
        features.append({"input_ids": input_ids, "labels": labels})
    if misaligned:
        log.warning(
            "%d examples: prompt ids were not a prefix of the full chat ids; masked the common "
            "prefix",
            misaligned,
        )
    if too_long:
        log.warning(
            "Dropped %d of %d examples whose prompt fills max_length=%d or that have no answer "
            "tokens",
            too_long,
            len(prompt_ids),
            max_length,
        )
    log.info("Tokenized %d examples (max_length=%d)", len(features), max_length)
    return features


def _chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids: list[list[int]] = []
    full_ids: list[list[int]] = []
    for start in range(0, len(prompts), _CHAT_BATCH):
        batch_p = prompts[start : start + _CHAT_BATCH]
        batch_r = responses[start : start + _CHAT_BATCH]
        user_turns = [[{"role": "user", "content": p}] for p in batch_p]
        exchanges = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(batch_p, batch_r, strict=True)
        ]
        prompt_ids += _ids_batch(
            tokenizer.apply_chat_template(user_turns, add_generation_prompt=True, tokenize=True)
        )
        full_ids += _ids_batch(tokenizer.apply_chat_template(exchanges, tokenize=True))
    return prompt_ids, full_ids


def _ids_batch(output: Any) -> list[list[int]]:
    """Normalise ``apply_chat_template(..., tokenize=True)`` output to a list of id lists.

    transformers 5 returns a ``BatchEncoding`` (``return_dict=True`` is the default there);
    4.x returned the ids themselves. Tensors appear if a caller's tokenizer forces them.
    """
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        output = output["input_ids"]
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    if output and isinstance(output[0], int):
        output = [output]
    return [[int(i) for i in ids] for ids in output]


def _plain_format_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    eos = tokenizer.eos_token or ""
    # The space before the answer belongs to the answer's first word: BPE and SentencePiece
    # vocabularies attach it there, so the prompt's ids stay a prefix of the full ids.
    prompt_texts = [f"User: {p}\nAssistant:" for p in prompts]
    full_texts = [f"{pt} {r}{eos}" for pt, r in zip(prompt_texts, responses, strict=True)]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(full_texts, add_special_tokens=True)["input_ids"]
    return [list(ids) for ids in prompt_ids], [list(ids) for ids in full_ids]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def collate_batch(
    features: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest sequence.

    Padding to the batch's longest example rather than a fixed ``max_length`` matters on CPU:
    chat-formatted chatterbot pairs average ~43 tokens, so a fixed 128 would triple the cost.

    Parameters
    ----------
    features : Sequence[Mapping[str, Sequence[int]]]
        Items from :func:`tokenize_examples` (``labels`` defaults to ``input_ids`` if absent).
    pad_token_id : int
        Id written into padded ``input_ids`` positions (masked out by ``attention_mask``).

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and ``labels`` (``-100``
        on padding), each a ``long`` tensor of shape ``(len(features), longest)``.
    """
    if not features:
        raise ValueError("collate_batch needs at least one example.")
    longest = max(len(f["input_ids"]) for f in features)
    shape = (len(features), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        ids = feature["input_ids"]
        row_labels = feature.get("labels", ids)
        if len(row_labels) != len(ids):
            raise ValueError(
                f"Example {row} has {len(ids)} input ids but {len(row_labels)} labels."
            )
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
