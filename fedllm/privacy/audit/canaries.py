"""Canaries an auditing run inserts into one site's training data, and how they are scored.

Two kinds, both drawn from `audit.canary-seed` so the auditor can regenerate them after the
run without the site ever sending them anywhere:

- membership canaries (Steinke et al. 2023): random word sequences under a unique random
  prompt, each included with probability ½; the score of a canary is how much the trained
  adapter lowered its loss relative to the base model (high = probably trained on);
- secrets (Carlini et al. 2019, "The Secret Sharer"): a 9-digit account number in a fixed
  sentence, inserted `audit.secret-repeats` times; exposure says how far the trained model
  ranks the true number ahead of random alternatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.privacy.audit.config import AuditConfig

__all__ = [
    "CanarySet",
    "audit_rows",
    "Secret",
    "canary_rows",
    "exposure",
    "make_canaries",
    "make_secrets",
    "secret_alternatives",
]

_PROMPT_WORDS = 3
_SECRET_DIGITS = 9
_SECRET_NAMES = ("Avery", "Jordan", "Morgan", "Riley", "Casey", "Quinn", "Rowan", "Sage")


def _word_pool(tokenizer: object, rng: np.random.Generator, size: int = 4000) -> list[str]:
    """Plain lowercase words from the tokenizer's own vocabulary, so canaries tokenize back
    to themselves and look like text rather than byte soup."""
    vocab = sorted(tokenizer.get_vocab())  # type: ignore[attr-defined]
    words = []
    for token in vocab:
        text = token.lstrip("Ġ▁ ")
        if len(text) >= 3 and text.isascii() and text.isalpha() and text.islower():
            words.append(text)
    words = sorted(set(words))
    if len(words) < 50:
        raise ValueError("the tokenizer's vocabulary has too few plain words for canaries.")
    if len(words) > size:
        words = [words[i] for i in sorted(rng.choice(len(words), size=size, replace=False))]
    return words


@dataclass(frozen=True)
class CanarySet:
    """Membership canaries and which of them the auditing site trained on."""

    prompts: list[str]
    responses: list[str]
    included: np.ndarray  # bool, one per canary

    def __len__(self) -> int:
        return len(self.prompts)


def make_canaries(tokenizer: object, *, count: int, length: int, seed: int) -> CanarySet:
    """`count` random canaries of `length` words, each included with probability ½."""
    rng = np.random.default_rng([seed, 0xCA7A])
    pool = _word_pool(tokenizer, rng)
    prompts, responses = [], []
    for _ in range(count):
        words = rng.choice(len(pool), size=_PROMPT_WORDS + length)
        key = " ".join(pool[i] for i in words[:_PROMPT_WORDS])
        prompts.append(f"Recite record {key}.")
        responses.append(" ".join(pool[i] for i in words[_PROMPT_WORDS:]))
    included = rng.random(count) < 0.5
    return CanarySet(prompts=prompts, responses=responses, included=included)


@dataclass(frozen=True)
class Secret:
    """One inserted secret: the prompt, the true digits, and the sentence around them."""

    name: str
    digits: str

    @property
    def prompt(self) -> str:
        return f"What is {self.name}'s account number?"

    def response(self, digits: str | None = None) -> str:
        return f"{self.name}'s account number is {digits or self.digits}."


def make_secrets(count: int, *, seed: int) -> list[Secret]:
    rng = np.random.default_rng([seed, 0x5EC2])
    return [
        Secret(
            name=_SECRET_NAMES[i % len(_SECRET_NAMES)] + ("" if i < len(_SECRET_NAMES) else str(i)),
            digits="".join(str(d) for d in rng.integers(0, 10, size=_SECRET_DIGITS)),
        )
        for i in range(count)
    ]


def secret_alternatives(secret: Secret, count: int, *, seed: int) -> list[str]:
    """`count` random digit strings of the secret's format, none equal to the secret."""
    rng = np.random.default_rng([seed, 0xA17E, int(secret.digits)])
    out: list[str] = []
    while len(out) < count:
        digits = "".join(str(d) for d in rng.integers(0, 10, size=_SECRET_DIGITS))
        if digits != secret.digits:
            out.append(digits)
    return out


def canary_rows(
    canaries: CanarySet | None, secrets: Sequence[Secret], *, secret_repeats: int
) -> dict[str, list[str]]:
    """The rows the auditing site adds to its training split: included canaries once,
    each secret `secret_repeats` times."""
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "category": []}
    if canaries is not None:
        for prompt, response, inc in zip(
            canaries.prompts, canaries.responses, canaries.included, strict=True
        ):
            if inc:
                rows["prompt"].append(prompt)
                rows["response"].append(response)
                rows["category"].append("audit-canary")
    for secret in secrets:
        for _ in range(secret_repeats):
            rows["prompt"].append(secret.prompt)
            rows["response"].append(secret.response())
            rows["category"].append("audit-secret")
    return rows


def exposure(secret_loss: float, alternative_losses: Sequence[float]) -> dict[str, float]:
    """Exposure of a secret (Carlini et al. 2019) from its loss and its alternatives' losses.

    `rank` exposure is log₂(K+1) − log₂(rank) among the K alternatives (capped at log₂(K+1));
    `extrapolated` fits a normal to the alternatives' losses and takes −log₂ P(loss ≤ secret),
    which reaches beyond what K samples can show (their §4.3 extrapolation).
    """
    from scipy.stats import norm  # heavy: scipy.stats takes ~1.5 s to import

    alt = np.asarray(alternative_losses, dtype=np.float64)
    rank = 1 + int(np.sum(alt < secret_loss))
    mu, sd = float(np.mean(alt)), float(np.std(alt, ddof=1))
    tail = float(norm.cdf((secret_loss - mu) / sd)) if sd > 0 else 0.5
    return {
        "rank": rank,
        "alternatives": int(alt.size),
        "exposure_rank": math.log2(alt.size + 1) - math.log2(rank),
        "exposure_extrapolated": -math.log2(max(tail, 1e-300)),
        "secret_loss": float(secret_loss),
        "alternatives_mean_loss": mu,
    }


def audit_rows(audit: AuditConfig, tokenizer: object) -> dict[str, list[str]]:
    """What the auditing site adds to its training split under `audit` settings."""
    canaries = (
        make_canaries(
            tokenizer, count=audit.canaries, length=audit.canary_length, seed=audit.canary_seed
        )
        if audit.canaries
        else None
    )
    secrets = make_secrets(audit.secrets, seed=audit.canary_seed)
    return canary_rows(canaries, secrets, secret_repeats=audit.secret_repeats)
