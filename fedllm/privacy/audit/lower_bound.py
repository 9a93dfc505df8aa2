"""Empirical ε lower bounds from membership guesses (pure maths).

Record level: the one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023, arXiv
2305.08846). m canaries are each included independently with probability ½; the auditor
guesses "in" for the k₊ highest scores, "out" for the k₋ lowest and abstains on the rest.
If the mechanism is (ε, δ)-DP, the number of correct guesses is stochastically dominated by
Binomial(r, e^ε / (1 + e^ε)) up to a δ term (their Theorem 3), so v correct guesses out of r
rule out every ε whose p-value is below 1 − confidence. No library ships this test (Opacus
and dp-accounting only bound ε from above), hence the transcription of their Algorithm 2.

User level: the one-shot estimate of Andrew et al. (ICLR 2024, arXiv 2302.03098). Canary
clients each push a fixed random direction; the cosine between the final model delta and
each inserted direction, against the cosines of directions never inserted, gives a Gaussian
mechanism's μ, turned into ε(δ) with dp-accounting. That is an estimate, not a bound with a
confidence level, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "GuessResult",
    "epsilon_lower_bound",
    "gaussian_mu_epsilon",
    "one_run_audit",
    "p_value",
]

DEFAULT_GUESS_COUNTS = (10, 25, 50, 100, 200, 400)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v of r guesses correct] under (ε, δ)-DP with m canaries (Steinke et al., Alg. 2).

    α = max over i in 1..v of P[v − i ≤ Binomial(r, q) < v] / i, vectorised.
    """
    from scipy.stats import binom  # heavy: scipy.stats takes ~1.5 s to import

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m}).")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if v > 0:
        i = np.arange(1, v + 1)
        alpha = float(np.max(np.cumsum(binom.pmf(v - i, r, q)) / i))
    return min(1.0, beta + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, alpha: float = 0.05) -> float:
    """The largest ε rejected at level `alpha`: the mechanism is not (ε, δ)-DP, w.p. 1 − α."""
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2
        if hi > 1e3:  # numerically certain: every guess right; cap rather than loop
            return lo
    for _ in range(40):  # bisection: p_value is increasing in ε
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessResult:
    """The audit's outcome, with what an auditor needs to redo it."""

    canaries: int
    included: int
    guesses: int
    correct: int
    k: int
    epsilon_lower_bound: float
    confidence: float
    delta: float
    guess_counts_tried: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def one_run_audit(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] = DEFAULT_GUESS_COUNTS,
) -> GuessResult:
    """Best ε lower bound over k₊ = k₋ = k in `guess_counts` (higher score = "in").

    Trying several k is multiple testing, so each test runs at (1 − confidence) / |k's|
    (Bonferroni): the reported bound holds at `confidence` for the best k, not only for a k
    fixed in advance.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.shape != inc.shape or s.ndim != 1:
        raise ValueError("scores and inclusion flags must be equal-length 1-D sequences.")
    if not np.all(np.isfinite(s)):
        raise ValueError("membership scores hold NaN or infinite values.")
    m = len(s)
    ks = [k for k in guess_counts if 2 * k <= m] or [m // 2]
    alpha = (1 - confidence) / len(ks)
    order = np.argsort(-s, kind="stable")  # descending; ties keep canary order
    best: GuessResult | None = None
    for k in ks:
        top, bottom = order[:k], order[m - k :]
        correct = int(inc[top].sum() + (~inc[bottom]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta=delta, alpha=alpha)
        result = GuessResult(
            canaries=m,
            included=int(inc.sum()),
            guesses=2 * k,
            correct=correct,
            k=k,
            epsilon_lower_bound=bound,
            confidence=confidence,
            delta=delta,
            guess_counts_tried=tuple(ks),
        )
        if best is None or bound > best.epsilon_lower_bound:
            best = result
    assert best is not None
    return best


def gaussian_mu_epsilon(
    inserted: Sequence[float], null: Sequence[float], *, delta: float
) -> dict[str, float]:
    """Andrew et al.'s estimate: μ = (mean_in − mean_null) / std_null, and the ε(δ) of a
    μ-GDP Gaussian mechanism (dp-accounting's PLD of a Gaussian with σ = 1/μ)."""
    # heavy: dp-accounting takes ~4 s to import; only this estimate needs it
    from dp_accounting.pld import privacy_loss_distribution as pld

    a, b = np.asarray(inserted, dtype=np.float64), np.asarray(null, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError("need at least two inserted and two null canary statistics.")
    spread = float(np.std(b, ddof=1))
    mu = max(0.0, (float(np.mean(a)) - float(np.mean(b))) / spread) if spread > 0 else math.inf
    if mu == 0.0:
        eps = 0.0
    elif not math.isfinite(mu) or mu > 60:
        eps = math.inf
    else:
        gaussian = pld.from_gaussian_mechanism(
            standard_deviation=1.0 / mu, value_discretization_interval=1e-3
        )
        eps = float(gaussian.get_epsilon_for_delta(delta))
    return {"mu": mu, "epsilon": eps, "delta": delta}
