"""The lexicon baseline: weighted regular expressions per harm category, no model at all.

A lexicon is a JSON file (the bundled one is ``fedllm/safety/data/lexicon.json``)::

    {"threshold": 0.5,
     "allow": ["kill(?:ing)? (?:a )?process", ...],
     "categories": {"violence": [["murder(?:s|ed)?", 0.5], ...], ...}}

Every pattern is matched case-insensitively between word boundaries (``\\b(?:PATTERN)\\b``).
``allow`` patterns are blanked out of the text first, so a known benign idiom ("kill the
process") cannot fire a harm pattern. A weight in (0, 1) is how likely one match alone means
harm; matches combine by noisy-OR (see `noisy_or`), per category and overall.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedllm.safety.base import FilterScores, SafetyError

__all__ = ["DEFAULT_LEXICON", "LexiconFilter", "LexiconMatch", "noisy_or"]

DEFAULT_LEXICON = Path(__file__).parent / "data" / "lexicon.json"


def noisy_or(weights: Iterable[float]) -> float:
    """Combine independent pieces of evidence: ``1 - prod(1 - w)``.

    One match of weight w scores w; more matches only raise the score, never past 1, and the
    order does not matter. An empty input scores 0. This is why the lexicon's scores stay in
    [0, 1] and mean roughly "probability that at least one match signals harm".
    """
    return 1.0 - math.prod(1.0 - w for w in weights)


@dataclass(frozen=True)
class LexiconMatch:
    """One pattern that fired on a text, for explaining a score."""

    category: str
    pattern: str
    weight: float
    text: str


@dataclass(frozen=True)
class _Pattern:
    category: str
    source: str
    weight: float
    regex: re.Pattern[str]


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(rf"\b(?:{pattern})\b", re.IGNORECASE)
    except re.error as e:
        raise SafetyError(f"{where}: pattern {pattern!r} is not a valid regex ({e}).") from e


class LexiconFilter:
    """Harm scores from weighted regex matches (see the module docstring for the format).

    Parameters
    ----------
    categories : Mapping[str, Sequence[tuple[str, float]]]
        Category name to ``(pattern, weight)`` pairs; weights in (0, 1).
    allow : Sequence[str] (default: ())
        Patterns removed from the text before matching.
    threshold : float (default: 0.5)
        Flag a text when its harm score is at least this.
    name : str (default: "lexicon")
        What reports call the filter.
    source : str (default: "<memory>")
        Where the lexicon came from, quoted in errors.
    """

    def __init__(
        self,
        categories: Mapping[str, Sequence[tuple[str, float]]],
        *,
        allow: Sequence[str] = (),
        threshold: float = 0.5,
        name: str = "lexicon",
        source: str = "<memory>",
    ) -> None:
        if not categories:
            raise SafetyError(f"lexicon {source} has no categories.")
        if not 0.0 <= threshold <= 1.0:
            raise SafetyError(f"lexicon {source}: threshold {threshold} is not in [0, 1].")
        patterns: list[_Pattern] = []
        for category, pairs in categories.items():
            where = f"lexicon {source}, category {category!r}"
            if not category or not pairs:
                raise SafetyError(f"{where}: a category needs a name and at least one pattern.")
            for pair in pairs:
                if len(pair) != 2:
                    raise SafetyError(f"{where}: each entry must be [pattern, weight], got {pair}.")
                pattern, weight = pair
                if not isinstance(weight, int | float) or not 0.0 < weight < 1.0:
                    raise SafetyError(f"{where}: weight of {pattern!r} must be in (0, 1).")
                patterns.append(
                    _Pattern(category, pattern, float(weight), _compile(pattern, where))
                )
        self.name = name
        self.threshold = float(threshold)
        self.source = source
        self._categories = tuple(categories)
        self._patterns = tuple(patterns)
        self._allow = tuple(_compile(p, f"lexicon {source}, allow list") for p in allow)

    @classmethod
    def load(cls, path: str | Path | None = None, *, name: str = "lexicon") -> LexiconFilter:
        """Read a lexicon JSON file (default: the bundled `DEFAULT_LEXICON`)."""
        path = Path(path) if path is not None else DEFAULT_LEXICON
        if not path.is_file():
            raise SafetyError(f"lexicon file {path} does not exist.")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SafetyError(f"lexicon file {path} is not valid JSON ({e.msg}).") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("categories"), dict):
            raise SafetyError(f"lexicon file {path} has no 'categories' object.")
        return cls(
            doc["categories"],
            allow=doc.get("allow", ()),
            threshold=doc.get("threshold", 0.5),
            name=name,
            source=str(path),
        )

    @property
    def categories(self) -> tuple[str, ...]:
        """The lexicon's categories, in file order."""
        return self._categories

    def _clean(self, text: str) -> str:
        for regex in self._allow:
            text = regex.sub(" ", text)
        return text

    def matches(self, text: str) -> list[LexiconMatch]:
        """Every pattern that fires on `text` (once each, with the first matching span)."""
        cleaned = self._clean(text)
        found = []
        for p in self._patterns:
            m = p.regex.search(cleaned)
            if m:
                found.append(LexiconMatch(p.category, p.source, p.weight, m.group(0)))
        return found

    def score(self, texts: Sequence[str], *, batch_size: int = 32) -> FilterScores:
        """Harm = noisy-OR of every matching pattern's weight; per category, of its own."""
        del batch_size  # regexes run one text at a time; kept for the protocol
        per_category = {c: np.zeros(len(texts)) for c in self._categories}
        harm = np.zeros(len(texts))
        for i, text in enumerate(texts):
            hits = self.matches(text)
            harm[i] = noisy_or(h.weight for h in hits)
            for category in {h.category for h in hits}:
                per_category[category][i] = noisy_or(
                    h.weight for h in hits if h.category == category
                )
        return FilterScores(harm=harm, categories=per_category)
