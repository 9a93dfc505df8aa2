"""The contract every safety filter meets: texts in, a harm score per text out, batched;
and, for a filter that judges an answer in the light of its prompt (a response filter, as
Llama Guard classifies a conversation), (prompt, answer) pairs in (`PairFilter`).

A score is a probability-like number in [0, 1] (higher = more harmful) so that thresholds,
ROC and PR curves mean the same across filters; `threshold` is the filter's own operating
point (0.5 unless it was calibrated). Filters with categories also return one score per
category per text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from fedllm.errors import FedllmError

__all__ = ["FilterScores", "PairFilter", "SafetyError", "SafetyFilter", "score_pairs"]


class SafetyError(FedllmError):
    """A safety filter cannot be loaded or used, or a labelled set is malformed."""


@dataclass(frozen=True)
class FilterScores:
    """Scores for a batch: `harm[i]` for text i, and `categories[name][i]` where the filter
    has categories (empty dict otherwise)."""

    harm: np.ndarray
    categories: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        harm = np.asarray(self.harm, dtype=np.float64)
        if harm.ndim != 1 or not np.all(np.isfinite(harm)):
            raise SafetyError("a filter returned harm scores that are not a finite 1-D array.")
        if harm.size and (harm.min() < 0 or harm.max() > 1):
            raise SafetyError("a filter returned harm scores outside [0, 1].")
        for name, scores in self.categories.items():
            if np.shape(scores) != harm.shape:
                raise SafetyError(f"category {name!r} scores do not match the batch size.")
        object.__setattr__(self, "harm", harm)


@runtime_checkable
class SafetyFilter(Protocol):
    """What `fedllm safety eval` and the round screening call."""

    name: str
    threshold: float  # flagged when harm >= threshold

    @property
    def categories(self) -> tuple[str, ...]:
        """The categories this filter scores (empty when it has none)."""
        ...

    def score(self, texts: Sequence[str], *, batch_size: int = 32) -> FilterScores:
        """Harm scores for `texts`, in order, computed `batch_size` at a time."""
        ...


@runtime_checkable
class PairFilter(SafetyFilter, Protocol):
    """A filter that scores an answer together with the prompt it answers: "how do I make a
    pipe bomb" / "Sure: ..." is harmful where the answer alone may read as chemistry."""

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
    ) -> FilterScores:
        """Harm scores for each answer to its prompt, in order."""
        ...


def score_pairs(
    safety_filter: SafetyFilter,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 32,
) -> FilterScores:
    """Scores for (prompt, answer) pairs: a `PairFilter` sees both; a text filter, which was
    built for single texts, sees the answer alone (what it was measured on)."""
    if len(prompts) != len(answers):
        raise SafetyError(f"{len(prompts)} prompts for {len(answers)} answers.")
    if isinstance(safety_filter, PairFilter):
        return safety_filter.score_pairs(list(prompts), list(answers), batch_size=batch_size)
    return safety_filter.score(list(answers), batch_size=batch_size)
