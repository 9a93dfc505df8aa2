"""Tests for fedllm.data: loading, partitioning, splitting, tokenising and collating."""

from __future__ import annotations

import json
import pathlib
import re
from collections import Counter

import datasets
import datasets.config
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedllm.data import (
    IGNORE_INDEX,
    collate_batch,
    load_examples,
    partition_examples,
    split_train_eval,
    tokenize_examples,
)
from fedllm.errors import ConfigError, DataError

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the ``datasets`` builder cache of each test inside its tmp dir, not in $HOME."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def chatterbot() -> datasets.Dataset:
    """Load the embedded corpus once for the module (it is read-only)."""
    return load_examples("chatterbot")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: pathlib.Path) -> PreTrainedTokenizerBase:
    """Return the tiny offline tokenizer with its ChatML chat template."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _small_dataset(categories: dict[str, int]) -> datasets.Dataset:
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "category": []}
    for category, count in categories.items():
        for i in range(count):
            rows["prompt"].append(f"{category} question {i}?")
            rows["response"].append(f"{category} answer {i}.")
            rows["category"].append(category)
    return datasets.Dataset.from_dict(rows)


def _write_jsonl(path: pathlib.Path, rows: list[dict[str, object]]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_chatterbot_loads_many_pairs_in_many_topics(chatterbot: datasets.Dataset) -> None:
    """The embedded corpus gives >1000 text pairs in >10 topics, with exactly our columns."""
    # Prepare
    categories = Counter(chatterbot["category"])

    # Execute
    first = chatterbot[0]

    # Assert
    assert chatterbot.column_names == ["prompt", "response", "category"]
    assert len(chatterbot) > 1000
    assert len(categories) > 10
    assert {"ai", "food", "tech_support"} <= set(categories)
    assert first["category"] == "ai"
    assert first["prompt"] == "What is AI?"
    assert all(
        p.strip() and r.strip()
        for p, r in zip(chatterbot["prompt"], chatterbot["response"], strict=True)
    )


def test_chatterbot_load_is_deterministic(chatterbot: datasets.Dataset) -> None:
    """Two loads give the same rows in the same order (partitions depend on it)."""
    # Execute
    again = load_examples("chatterbot")

    # Assert
    assert again["prompt"] == chatterbot["prompt"]
    assert again["category"] == chatterbot["category"]


def test_load_jsonl_with_custom_fields(tmp_path: pathlib.Path) -> None:
    """A JSONL file's configured columns become prompt/response/category; blank rows drop."""
    # Prepare
    path = _write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "What is 2+2?", "answer": 4, "topic": "maths", "id": 1},
            {"question": "Capital of France?", "answer": "Paris", "topic": "geo", "id": 2},
            {"question": "  ", "answer": "dropped", "topic": "geo", "id": 3},
        ],
    )

    # Execute
    ds = load_examples(
        str(path), prompt_field="question", response_field="answer", category_field="topic"
    )

    # Assert
    assert ds.column_names == ["prompt", "response", "category"]
    assert ds["prompt"] == ["What is 2+2?", "Capital of France?"]
    assert ds["response"] == ["4", "Paris"]
    assert ds["category"] == ["maths", "geo"]


def test_load_csv_without_category_column_uses_all(tmp_path: pathlib.Path) -> None:
    """A CSV without the category column puts every example in category 'all'."""
    # Prepare
    path = tmp_path / "qa.csv"
    path.write_text("q,a\nHello there,General Kenobi\nHow are you?,Fine.\n", encoding="utf-8")

    # Execute
    ds = load_examples(str(path), prompt_field="q", response_field="a")
    ds_none = load_examples(str(path), prompt_field="q", response_field="a", category_field=None)

    # Assert
    assert ds["prompt"] == ["Hello there", "How are you?"]
    assert ds["response"] == ["General Kenobi", "Fine."]
    assert ds["category"] == ["all", "all"]
    assert ds_none["category"] == ["all", "all"]


def test_load_chat_messages_jsonl(tmp_path: pathlib.Path) -> None:
    """Chat-style rows give the first user turn and the assistant turn that answers it."""
    # Prepare
    path = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Later turn"},
                    {"role": "assistant", "content": "Ignored"},
                ],
                "domain": "greetings",
            },
            {
                "messages": [
                    {"role": "user", "content": "Name a colour."},
                    {"role": "assistant", "content": "Blue."},
                ],
                "domain": "colours",
            },
        ],
    )

    # Execute
    ds = load_examples(str(path), category_field="domain")

    # Assert
    assert ds["prompt"] == ["Hi!", "Name a colour."]
    assert ds["response"] == ["Hello.", "Blue."]
    assert ds["category"] == ["greetings", "colours"]


def test_load_saved_dataset_directory(tmp_path: pathlib.Path) -> None:
    """A directory written by Dataset.save_to_disk loads like a file."""
    # Prepare
    _small_dataset({"a": 2, "b": 1}).save_to_disk(str(tmp_path / "saved"))

    # Execute
    ds = load_examples(str(tmp_path / "saved"))

    # Assert
    assert len(ds) == 3
    assert ds["category"] == ["a", "a", "b"]


def test_missing_file_names_the_path(tmp_path: pathlib.Path) -> None:
    """A data file that does not exist is a DataError naming it."""
    # Prepare
    path = tmp_path / "nope.jsonl"

    # Execute / Assert
    with pytest.raises(DataError, match=r"nope\.jsonl.*does not exist"):
        load_examples(str(path))


def test_missing_column_names_column_and_lists_present_ones(tmp_path: pathlib.Path) -> None:
    """A missing prompt column is named, with the file and the columns that do exist."""
    # Prepare
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])

    # Execute / Assert
    with pytest.raises(DataError, match=r"qa\.jsonl.*no column 'prompt'.*question, answer"):
        load_examples(str(path))
    with pytest.raises(DataError, match=r"no column 'reply'.*data\.response-field"):
        load_examples(str(path), prompt_field="question", response_field="reply")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file_is_a_data_error(tmp_path: pathlib.Path, name: str) -> None:
    """An empty data file is a DataError naming it, not a StopIteration from datasets."""
    # Prepare
    path = tmp_path / name
    path.write_text("", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(DataError, match=re.escape(name) + ".*is empty"):
        load_examples(str(path))


def test_file_with_only_blank_answers_has_no_examples(tmp_path: pathlib.Path) -> None:
    """Rows without a usable response leave zero examples, which is a DataError."""
    # Prepare
    path = _write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "q", "response": "  "}])

    # Execute / Assert
    with pytest.raises(DataError, match=r"blank\.jsonl.*no usable examples"):
        load_examples(str(path))


def test_unreadable_hub_id_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id that cannot be fetched offline is a DataError naming the id."""
    # Prepare: offline mode fails at once instead of retrying the network for ~20 s
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    # Execute / Assert
    with pytest.raises(DataError, match=r"'nobody/no-such-dataset'.*could not be loaded"):
        load_examples("nobody/no-such-dataset")


# --------------------------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------------------------


def test_by_category_partition_gives_disjoint_topics(chatterbot: datasets.Dataset) -> None:
    """Every site gets its own topics, every example lands once, and sizes are balanced."""
    # Execute
    sites = partition_examples(chatterbot, num_sites=3, scheme="by-category")

    # Assert
    assert len(sites) == 3
    topic_sets = [set(site["category"]) for site in sites]
    for i in range(3):
        for j in range(i + 1, 3):
            assert topic_sets[i].isdisjoint(topic_sets[j])
    assert set().union(*topic_sets) == set(chatterbot["category"])
    assert sites[0].column_names == chatterbot.column_names
    assert sum(len(s) for s in sites) == len(chatterbot)
    every = Counter(
        zip(chatterbot["prompt"], chatterbot["response"], chatterbot["category"], strict=True)
    )
    got = Counter(
        pair for s in sites for pair in zip(s["prompt"], s["response"], s["category"], strict=True)
    )
    assert got == every
    # Whole topics cannot split tech_support (~45% of pairs): the other sites share the rest
    # evenly, and no site is larger than the largest topic or the even share.
    sizes = sorted(len(s) for s in sites)
    largest_topic = max(Counter(chatterbot["category"]).values())
    assert sizes[-1] <= max(largest_topic, len(chatterbot) // 3 + 1)
    assert sizes[1] - sizes[0] <= 0.1 * sizes[1]


def test_by_category_partition_is_deterministic_and_balanced() -> None:
    """Greedy largest-first packing gives the same, balanced assignment every time."""
    # Prepare
    ds = _small_dataset({"a": 6, "b": 5, "c": 4, "d": 3, "e": 2})

    # Execute
    first = partition_examples(ds, num_sites=2, scheme="by-category")
    second = partition_examples(ds, num_sites=2, scheme="by-category")

    # Assert: a(6) -> 0, b(5) -> 1, c(4) -> 1, d(3) -> 0, e(2) -> 0 gives 11 and 9
    assert [sorted(set(s["category"])) for s in first] == [["a", "d", "e"], ["b", "c"]]
    assert [len(s) for s in first] == [11, 9]
    assert [s["prompt"] for s in first] == [s["prompt"] for s in second]


def test_iid_partition_sizes_and_mixing(chatterbot: datasets.Dataset) -> None:
    """IID sites are equal in size (±1), mixed across topics, and cover every example."""
    # Execute
    sites = partition_examples(chatterbot, num_sites=4, scheme="iid", seed=1)

    # Assert
    sizes = [len(s) for s in sites]
    assert sum(sizes) == len(chatterbot)
    assert max(sizes) - min(sizes) <= 1
    assert all(len(set(s["category"])) > 10 for s in sites)


def test_dirichlet_partition_covers_every_example(chatterbot: datasets.Dataset) -> None:
    """Dirichlet sites are non-empty, reproducible and together hold every example once."""
    # Execute
    sites = partition_examples(chatterbot, num_sites=3, scheme="dirichlet", alpha=0.5, seed=3)
    again = partition_examples(chatterbot, num_sites=3, scheme="dirichlet", alpha=0.5, seed=3)

    # Assert
    assert all(len(s) >= 10 for s in sites)
    assert sum(len(s) for s in sites) == len(chatterbot)
    assert [s["prompt"] for s in sites] == [s["prompt"] for s in again]


def test_fewer_categories_than_sites_is_a_data_error() -> None:
    """by-category cannot give three sites different topics when there are only two."""
    # Prepare
    ds = _small_dataset({"x": 4, "y": 4})

    # Execute / Assert
    with pytest.raises(DataError, match=r"Only 2 categories \(x, y\) for 3 sites"):
        partition_examples(ds, num_sites=3, scheme="by-category")


def test_unknown_scheme_is_a_config_error() -> None:
    """An unknown partitioner names the config key and lists the known schemes."""
    # Prepare
    ds = _small_dataset({"x": 4})

    # Execute / Assert
    with pytest.raises(ConfigError, match=r"data\.partitioner = 'shards'.*by-category.*iid"):
        partition_examples(ds, num_sites=2, scheme="shards")


def test_more_sites_than_examples_is_a_data_error() -> None:
    """Sites that would be empty are refused before partitioning."""
    # Prepare
    ds = _small_dataset({"x": 2})

    # Execute / Assert
    with pytest.raises(DataError, match=r"2 examples cannot fill 3 sites"):
        partition_examples(ds, num_sites=3, scheme="iid")


# --------------------------------------------------------------------------------------------
# Train / eval split
# --------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_respects_max_eval() -> None:
    """The same seed gives the same split; eval size follows the fraction up to the cap."""
    # Prepare
    ds = _small_dataset({"x": 50})

    # Execute
    train, evals = split_train_eval(ds, eval_fraction=0.1, max_eval_examples=24, seed=7)
    train2, evals2 = split_train_eval(ds, eval_fraction=0.1, max_eval_examples=24, seed=7)
    _, capped = split_train_eval(ds, eval_fraction=0.5, max_eval_examples=3, seed=7)
    _, other = split_train_eval(ds, eval_fraction=0.1, max_eval_examples=24, seed=8)

    # Assert
    assert len(evals) == 6  # records with u < 0.1 under seed 7 (Binomial(50, 0.1), mean 5)
    assert len(train) == 44
    assert train["prompt"] == train2["prompt"]
    assert evals["prompt"] == evals2["prompt"]
    assert set(train["prompt"]).isdisjoint(evals["prompt"])
    assert set(train["prompt"]) | set(evals["prompt"]) == set(ds["prompt"])
    assert len(capped) == 3
    assert other["prompt"] != evals["prompt"]


def test_split_keeps_one_eval_and_one_train_example() -> None:
    """A tiny site still gets one eval example (and keeps one for training)."""
    # Prepare
    ds = _small_dataset({"x": 2})

    # Execute
    train, evals = split_train_eval(ds, eval_fraction=0.01, max_eval_examples=10, seed=0)

    # Assert
    assert (len(train), len(evals)) == (1, 1)


def test_split_of_a_single_example_is_a_data_error() -> None:
    """One example cannot be both trained on and held out."""
    # Prepare
    ds = _small_dataset({"x": 1})

    # Execute / Assert
    with pytest.raises(DataError, match=r"1 example\(s\) cannot be split"):
        split_train_eval(ds, eval_fraction=0.1, max_eval_examples=10, seed=0)


# --------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------


def test_tokenize_masks_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    """Labels are -100 exactly on the chat-formatted prompt and equal the ids on the answer."""
    # Prepare
    ds = datasets.Dataset.from_dict(
        {"prompt": ["What is AI?"], "response": ["A branch of science."], "category": ["ai"]}
    )
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is AI?"}], add_generation_prompt=True, tokenize=True
    )["input_ids"]

    # Execute
    [feature] = tokenize_examples(ds, tokenizer, max_length=256)

    # Assert
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels)
    n_prompt = len(prompt_ids)
    assert ids[:n_prompt] == prompt_ids
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert IGNORE_INDEX not in labels[n_prompt:]
    answer = tokenizer.decode(ids[n_prompt:])
    assert answer.startswith("A branch of science.")
    assert tokenizer.eos_token in answer
    assert "What is AI?" in tokenizer.decode(ids[:n_prompt])


def test_tokenize_truncates_and_drops_long_prompts(tokenizer: PreTrainedTokenizerBase) -> None:
    """Long answers are cut to max_length; examples whose prompt fills it are dropped."""
    # Prepare
    ds = datasets.Dataset.from_dict(
        {
            "prompt": ["Hi", "word " * 200],
            "response": ["hello " * 100, "short"],
            "category": ["a", "a"],
        }
    )

    # Execute
    features = tokenize_examples(ds, tokenizer, max_length=80)

    # Assert
    assert len(features) == 1
    [feature] = features
    assert len(feature["input_ids"]) == 80
    assert feature["labels"][-1] == feature["input_ids"][-1] != IGNORE_INDEX


def test_tokenize_without_chat_template_uses_plain_format(
    tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a chat template the plain User/Assistant format is used, with one warning."""
    # Prepare
    monkeypatch.setattr(tokenizer, "chat_template", None)
    ds = datasets.Dataset.from_dict(
        {"prompt": ["Hi", "Bye"], "response": ["Hello.", "Goodbye."], "category": ["a", "a"]}
    )

    # Execute
    features = tokenize_examples(ds, tokenizer, max_length=64)

    # Assert
    assert len(features) == 2
    text = tokenizer.decode(features[0]["input_ids"])
    assert text.startswith("User: Hi\nAssistant: Hello.")
    answer = [
        t
        for t, lab in zip(features[0]["input_ids"], features[0]["labels"], strict=True)
        if lab != IGNORE_INDEX
    ]
    assert tokenizer.decode(answer).strip().startswith("Hello.")
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1


def test_collate_pads_to_the_longest_in_the_batch() -> None:
    """Padding goes to this batch's longest example, with masks and -100 labels on padding."""
    # Prepare
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]

    # Execute
    batch = collate_batch(features, pad_token_id=0)

    # Assert
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 3),
        "attention_mask": (2, 3),
        "labels": (2, 3),
    }
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_single_example_has_no_padding() -> None:
    """A batch of one is returned at its own length with a full attention mask."""
    # Prepare
    features = [{"input_ids": [1, 2], "labels": [-100, 2]}]

    # Execute
    batch = collate_batch(features, pad_token_id=9)

    # Assert
    assert batch["input_ids"].tolist() == [[1, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1]]
    assert batch["labels"].tolist() == [[-100, 2]]


def test_tokenized_chatterbot_batch_is_short(
    chatterbot: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
) -> None:
    """End to end: real pairs tokenize and collate to the batch's own length, not max_length."""
    # Prepare
    features = tokenize_examples(chatterbot.select(range(8)), tokenizer, max_length=512)

    # Execute
    batch = collate_batch(features, pad_token_id=tokenizer.pad_token_id)

    # Assert
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (8, longest)
    assert longest < 512
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in features)
