"""Tests for the per-record, hash-decided train/held-out split (`split_train_eval`)."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib

import datasets
import datasets.config
import pytest

from fedllm.data import split_train_eval

BIG_CAP = 10**9  # a cap that never binds


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the ``datasets`` builder cache of each test inside its tmp dir, not in $HOME."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _rows(n: int, *, tag: str = "r") -> list[dict[str, str]]:
    return [
        {"prompt": f"{tag} question {i}?", "response": f"{tag} answer {i}.", "category": "c"}
        for i in range(n)
    ]


def _ds(rows: list[dict[str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _u(seed: int, row: dict[str, str]) -> float:
    """The documented hash of one record, recomputed independently, in [0, 1)."""
    payload = json.dumps(
        [
            "fedllm.split-train-eval.v1",
            seed,
            row["prompt"],
            row["response"],
            row.get("category"),
        ],
        separators=(",", ":"),
    )
    return int.from_bytes(hashlib.sha256(payload.encode("utf-8")).digest()[:8], "big") / 2**64


def _held_prompts(rows: list[dict[str, str]], *, fraction: float, cap: int, seed: int) -> set:
    _, held = split_train_eval(_ds(rows), eval_fraction=fraction, max_eval_examples=cap, seed=seed)
    return set(held["prompt"])


def test_a_record_is_held_out_iff_its_hash_is_below_the_fraction() -> None:
    """Without the cap, the held-out set is exactly the records with u < eval_fraction."""
    # Prepare
    rows = _rows(400)

    # Execute
    train, held = split_train_eval(_ds(rows), eval_fraction=0.2, max_eval_examples=BIG_CAP, seed=3)

    # Assert
    expected = {r["prompt"] for r in rows if _u(3, r) < 0.2}
    assert 0 < len(expected) < len(rows)
    assert set(held["prompt"]) == expected
    assert train["prompt"] == [r["prompt"] for r in rows if r["prompt"] not in expected]
    assert held["prompt"] == [r["prompt"] for r in rows if r["prompt"] in expected]


@pytest.mark.parametrize("position", [0, 150, 300])
def test_adding_one_record_moves_no_other_record(position: int) -> None:
    """With the cap not binding, a new record (anywhere in the order) leaves every other
    record on its side."""
    # Prepare
    rows = _rows(300)
    before = _held_prompts(rows, fraction=0.25, cap=BIG_CAP, seed=0)
    new = {"prompt": "a brand new question?", "response": "a new answer.", "category": "c"}
    grown = [*rows[:position], new, *rows[position:]]

    # Execute
    after = _held_prompts(grown, fraction=0.25, cap=BIG_CAP, seed=0)

    # Assert
    assert 0 < len(before) < len(rows)
    assert after - {new["prompt"]} == before


@pytest.mark.parametrize("removed", [0, 1, 2, 3, 4, 5, 6, 7, 150, 299])
def test_removing_one_record_moves_no_other_record(removed: int) -> None:
    """With the cap not binding, dropping any one record (held-out or train) leaves every
    other record on its side."""
    # Prepare
    rows = _rows(300)
    before = _held_prompts(rows, fraction=0.25, cap=BIG_CAP, seed=0)
    gone = rows[removed]["prompt"]

    # Execute
    after = _held_prompts(rows[:removed] + rows[removed + 1 :], fraction=0.25, cap=BIG_CAP, seed=0)

    # Assert
    assert after == before - {gone}


def test_removed_records_cover_both_sides() -> None:
    """The removal test above removes held-out and train records alike (so it tests both)."""
    # Prepare
    rows = _rows(300)

    # Execute
    held = _held_prompts(rows, fraction=0.25, cap=BIG_CAP, seed=0)

    # Assert
    removed = {rows[i]["prompt"] for i in (0, 1, 2, 3, 4, 5, 6, 7, 150, 299)}
    assert removed & held
    assert removed - held


def test_the_same_seed_gives_the_same_split() -> None:
    """Two calls with one seed split identically, rows and order alike."""
    # Prepare
    ds = _ds(_rows(200))

    # Execute
    a = split_train_eval(ds, eval_fraction=0.1, max_eval_examples=BIG_CAP, seed=11)
    b = split_train_eval(ds, eval_fraction=0.1, max_eval_examples=BIG_CAP, seed=11)

    # Assert
    assert a[0]["prompt"] == b[0]["prompt"]
    assert a[1]["prompt"] == b[1]["prompt"]


def test_the_split_depends_on_the_seed() -> None:
    """Another seed gives another held-out set (overlap about fraction**2 of the records)."""
    # Prepare
    rows = _rows(500)

    # Execute
    a = _held_prompts(rows, fraction=0.2, cap=BIG_CAP, seed=0)
    b = _held_prompts(rows, fraction=0.2, cap=BIG_CAP, seed=1)

    # Assert
    assert a != b
    assert len(a & b) < 0.5 * min(len(a), len(b))


def test_duplicates_land_on_the_same_side() -> None:
    """Content-identical copies, scattered through the site, are all held out or all train."""
    # Prepare
    distinct = _rows(120)
    rows = distinct * 3  # each record three times, 120 positions apart

    # Execute
    train, held = split_train_eval(_ds(rows), eval_fraction=0.3, max_eval_examples=BIG_CAP, seed=0)

    # Assert
    held_counts = {p: held["prompt"].count(p) for p in set(held["prompt"])}
    assert held_counts and set(held_counts.values()) == {3}
    assert set(train["prompt"]).isdisjoint(held_counts)


def test_a_record_differing_only_in_category_is_another_record() -> None:
    """The category is part of the record's content: it changes the hash, so its side."""
    # Prepare
    rows = _rows(200)
    recategorised = [{**r, "category": "other"} for r in rows]

    # Execute
    a = _held_prompts(rows, fraction=0.3, cap=BIG_CAP, seed=0)
    b = _held_prompts(recategorised, fraction=0.3, cap=BIG_CAP, seed=0)

    # Assert
    assert a != b


def test_a_site_without_a_category_column_splits_by_prompt_and_response() -> None:
    """Without a category column the record is (prompt, response), hashed with null."""
    # Prepare
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in _rows(200)]

    # Execute
    held = _held_prompts(rows, fraction=0.3, cap=BIG_CAP, seed=0)

    # Assert
    assert held == {r["prompt"] for r in rows if _u(0, r) < 0.3}


@pytest.mark.parametrize(("fraction", "seed"), [(0.1, 0), (0.1, 1), (0.3, 2), (0.05, 3)])
def test_held_out_size_follows_the_fraction(fraction: float, seed: int) -> None:
    """On 2,000 records the held-out count is Binomial(n, fraction): within 4 sd of n*f."""
    # Prepare
    n = 2000
    ds = _ds(_rows(n, tag=f"s{seed}"))

    # Execute
    train, held = split_train_eval(ds, eval_fraction=fraction, max_eval_examples=BIG_CAP, seed=seed)

    # Assert
    sd = math.sqrt(n * fraction * (1 - fraction))
    assert abs(len(held) - n * fraction) <= 4 * sd
    assert len(train) + len(held) == n


def test_the_cap_keeps_the_held_out_records_of_smallest_hash() -> None:
    """A binding cap keeps exactly the cap held-out records of smallest hash."""
    # Prepare
    rows = _rows(500)
    uncapped = sorted((_u(5, r), r["prompt"]) for r in rows if _u(5, r) < 0.2)

    # Execute
    held = _held_prompts(rows, fraction=0.2, cap=17, seed=5)

    # Assert
    assert len(uncapped) > 17
    assert held == {p for _, p in uncapped[:17]}


def test_the_cap_does_not_separate_duplicates() -> None:
    """When the cap would fall inside a group of copies, the whole group goes to train."""
    # Prepare
    distinct = _rows(300)
    smallest = _held_prompts(distinct, fraction=0.2, cap=4, seed=0)  # the 4 smallest hashes
    rows = distinct * 3

    # Execute
    train, held = split_train_eval(_ds(rows), eval_fraction=0.2, max_eval_examples=14, seed=0)

    # Assert: 4 groups of 3 fit in 14, the fifth group would not
    assert sorted(held["prompt"]) == sorted(list(smallest) * 3)
    assert set(train["prompt"]).isdisjoint(smallest)


def test_adding_a_record_under_a_binding_cap_moves_at_most_the_largest_hash_one_back() -> None:
    """With the cap binding, a new record moves no train record into held-out, and at most
    one held-out record (the one of largest hash) back to train."""
    # Prepare
    rows = _rows(400)
    before = _held_prompts(rows, fraction=0.2, cap=20, seed=0)
    largest = max(before, key=lambda p: _u(0, next(r for r in rows if r["prompt"] == p)))
    moved_back_count = 0

    # Execute
    for k in range(200):
        new = {"prompt": f"extra question {k}?", "response": f"extra answer {k}.", "category": "c"}
        after = _held_prompts([*rows, new], fraction=0.2, cap=20, seed=0) - {new["prompt"]}
        moved_back = before - after

        # Assert
        assert after <= before
        assert moved_back in (set(), {largest})
        moved_back_count += bool(moved_back)
    assert moved_back_count > 0  # some new record did take a held-out place


def test_removing_a_record_under_a_binding_cap_moves_at_most_one_train_record_in() -> None:
    """With the cap binding, removing a held-out record frees one place, which goes to the
    train record of next-smallest hash; no held-out record leaves."""
    # Prepare
    rows = _rows(400)
    before = _held_prompts(rows, fraction=0.2, cap=20, seed=0)
    ranked = sorted((_u(0, r), r["prompt"]) for r in rows if _u(0, r) < 0.2)
    next_in = ranked[20][1]
    removed = next(i for i, r in enumerate(rows) if r["prompt"] in before)

    # Execute
    after = _held_prompts(rows[:removed] + rows[removed + 1 :], fraction=0.2, cap=20, seed=0)

    # Assert
    assert after == (before - {rows[removed]["prompt"]}) | {next_in}


def test_held_out_is_never_empty() -> None:
    """If no record's hash is below the fraction, the record of smallest hash is held out."""
    # Prepare
    rows = _rows(6)

    # Execute
    train, held = split_train_eval(_ds(rows), eval_fraction=1e-12, max_eval_examples=5, seed=0)

    # Assert
    smallest = min(rows, key=lambda r: _u(0, r))["prompt"]
    assert held["prompt"] == [smallest]
    assert len(train) == 5


def test_train_is_never_empty() -> None:
    """If every record's hash is below the fraction, the one of largest hash is trained on."""
    # Prepare
    rows = _rows(6)

    # Execute
    train, held = split_train_eval(
        _ds(rows), eval_fraction=1 - 1e-12, max_eval_examples=BIG_CAP, seed=0
    )

    # Assert
    largest = max(rows, key=lambda r: _u(0, r))["prompt"]
    assert train["prompt"] == [largest]
    assert len(held) == 5


def test_two_identical_records_still_split_one_and_one() -> None:
    """A site of two copies of one record falls back to one held out and one trained on."""
    # Prepare
    rows = _rows(1) * 2

    # Execute
    for fraction in (1e-12, 0.5, 1 - 1e-12):
        train, held = split_train_eval(
            _ds(rows), eval_fraction=fraction, max_eval_examples=10, seed=0
        )

        # Assert
        assert (len(train), len(held)) == (1, 1)


def test_a_run_made_before_data_split_resumes_only_under_the_permutation(tmp_path) -> None:
    """An old run directory (no data.split in its config) is refused under the new default
    with the key to set named, and found again under data.split = "permutation"."""
    import json

    import pytest

    from fedllm.config import parse_config
    from fedllm.errors import RunDirError
    from fedllm.rundir import RunDir

    old = {"run.name": "old", "run.output-dir": str(tmp_path), "data.split": "permutation"}
    run = RunDir.create(parse_config(old), {"rounds_completed": 1})
    saved = json.loads(run.config_path.read_text())
    del saved["config"]["data"]["split"]  # as the config of a run made before the key
    run.config_path.write_text(json.dumps(saved))
    with pytest.raises(RunDirError, match='resume it with data.split = "permutation"'):
        RunDir.find(parse_config({k: v for k, v in old.items() if k != "data.split"}))
    assert RunDir.find(parse_config(old)) is not None
