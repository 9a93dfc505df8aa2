"""Empirical privacy audits: the one-run lower bound, canaries, secrets and canary clients."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedllm.privacy.audit.canaries import (
    canary_rows,
    exposure,
    make_canaries,
    make_secrets,
    secret_alternatives,
)
from fedllm.privacy.audit.directions import CanaryDirections
from fedllm.privacy.audit.lower_bound import (
    epsilon_lower_bound,
    gaussian_mu_epsilon,
    one_run_audit,
    p_value,
)
from tests.tiny import make_tiny_tokenizer


def test_p_value_at_zero_delta_is_the_binomial_tail() -> None:
    """With δ = 0 the p-value is P[Binomial(r, e^ε/(1+e^ε)) ≥ v] (Steinke et al., Thm 2)."""
    # Prepare
    from scipy.stats import binom

    eps = 1.0
    q = math.exp(eps) / (1 + math.exp(eps))
    # Execute
    value = p_value(1000, 100, 80, eps, 0.0)
    # Assert
    assert value == pytest.approx(float(binom.sf(79, 100, q)), rel=1e-12)


def test_lower_bound_is_zero_for_chance_guesses_and_grows_with_accuracy() -> None:
    """Half the guesses right proves nothing; all 100 right proves ε > ln(p/(1-p)) for
    p = 0.05^(1/100), about 3.0; δ only lowers the bound."""
    # Prepare / Execute
    chance = epsilon_lower_bound(1000, 100, 50, delta=1e-5)
    perfect = epsilon_lower_bound(1000, 100, 100, delta=0.0)
    with_delta = epsilon_lower_bound(1000, 100, 100, delta=1e-4)
    # Assert
    p = 0.05 ** (1 / 100)
    assert chance == 0.0
    assert perfect == pytest.approx(math.log(p / (1 - p)), abs=1e-6)
    assert 0 < with_delta < perfect


def test_randomized_response_at_known_epsilon_is_never_over_bounded() -> None:
    """Audit ε-DP randomized response (the worst case for this test) on 1000 canaries, 300
    times: the 95% lower bound exceeds the true ε in at most ~5% of runs, as its confidence
    level promises, and is tight (well above 0) on average."""
    # Prepare
    eps, rng = 2.0, np.random.default_rng(0)
    keep = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(300):
        included = rng.random(1000) < 0.5
        truthful = rng.random(1000) < keep
        scores = np.where(truthful == included, 1.0, 0.0) + 1e-3 * rng.random(1000)
        # Execute
        bounds.append(one_run_audit(scores, included, delta=0.0).epsilon_lower_bound)
    # Assert
    exceed = float(np.mean(np.asarray(bounds) > eps))
    assert exceed <= 0.05 + 0.02  # 0.05 plus sampling slack over 300 runs (seen: 0.027)
    assert np.mean(bounds) > 1.5


def test_perfectly_separated_scores_give_a_high_bound_and_reversed_ones_zero() -> None:
    """Scores that equal membership give a large bound; scores that invert it give 0."""
    # Prepare
    included = np.random.default_rng(1).random(1000) < 0.5
    # Execute
    good = one_run_audit(included.astype(float), included, delta=1e-5)
    bad = one_run_audit(-included.astype(float), included, delta=1e-5)
    # Assert
    assert good.correct == good.guesses and good.epsilon_lower_bound > 4
    assert bad.epsilon_lower_bound == 0.0
    assert good.guess_counts_tried == (10, 25, 50, 100, 200, 400)


def test_audit_refuses_nan_scores_and_mismatched_lengths() -> None:
    """Bad membership scores are an error naming what is wrong, not a silent bound."""
    # Prepare / Execute / Assert
    with pytest.raises(ValueError, match="NaN"):
        one_run_audit([0.1, float("nan")], [True, False], delta=1e-5)
    with pytest.raises(ValueError, match="equal-length"):
        one_run_audit([0.1, 0.2], [True], delta=1e-5)


def test_gaussian_mu_epsilon_matches_the_analytic_gaussian_mechanism() -> None:
    """μ ≈ 1 from synthetic statistics gives the ε(δ) that the analytic Gaussian mechanism
    (Balle & Wang 2018: δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)) gives for that μ."""
    # Prepare
    rng = np.random.default_rng(0)
    null = rng.standard_normal(200_000)
    inserted = null[:100_000] + 1.0
    # Execute
    out = gaussian_mu_epsilon(inserted, null, delta=1e-5)
    # Assert
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = out["mu"]
    analytic = brentq(
        lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - 1e-5,
        0.01,
        20,
    )
    assert mu == pytest.approx(1.0, abs=0.02)
    assert out["epsilon"] == pytest.approx(analytic, abs=0.02)


def test_canaries_are_reproducible_words_included_about_half_the_time() -> None:
    """Same seed, same canaries; each included w.p. ½; the rows added are exactly the
    included canaries plus each secret repeated."""
    # Prepare
    tok = make_tiny_tokenizer()
    # Execute
    a = make_canaries(tok, count=1000, length=4, seed=3)
    b = make_canaries(tok, count=1000, length=4, seed=3)
    c = make_canaries(tok, count=1000, length=4, seed=4)
    secrets = make_secrets(2, seed=3)
    rows = canary_rows(a, secrets, secret_repeats=5)
    # Assert
    assert a.prompts == b.prompts and np.array_equal(a.included, b.included)
    assert a.prompts != c.prompts
    assert 440 < int(a.included.sum()) < 560
    assert len(set(a.prompts)) == 1000 and all(len(r.split()) == 4 for r in a.responses)
    assert len(rows["prompt"]) == int(a.included.sum()) + 10
    assert rows["response"].count(secrets[0].response()) == 5
    assert secrets[0].digits not in secret_alternatives(secrets[0], 500, seed=3)


def test_exposure_is_maximal_for_the_lowest_loss_and_zero_for_the_highest() -> None:
    """Rank exposure: log2(K+1) when the secret beats every alternative, ~0 when last."""
    # Prepare
    alternatives = np.linspace(1.0, 2.0, 1023)
    # Execute
    best = exposure(0.5, alternatives)
    worst = exposure(3.0, alternatives)
    # Assert
    assert best["exposure_rank"] == pytest.approx(10.0)
    assert best["exposure_extrapolated"] > 10.0
    assert worst["exposure_rank"] == pytest.approx(0.0, abs=1e-9)


def test_canary_clients_estimate_finds_an_unnoised_canary_and_not_a_noised_one() -> None:
    """A delta that is the plain sum of the inserted directions gives a huge μ; the same
    sum drowned in Gaussian noise of std z·S per coordinate gives a μ near √1/z · 1 ... small."""
    # Prepare
    shapes = {"a": (64, 16), "b": (32, 8)}
    cc = CanaryDirections(count=200, seed=0, shapes=shapes)
    inserted = cc.sample(1.0, np.random.default_rng(0))
    signal = cc.contribution(inserted, 1.0)
    rng = np.random.default_rng(1)
    noisy = {n: v + rng.normal(0, 8.0, size=v.shape) for n, v in signal.items()}
    # Execute
    clean = cc.estimate(signal, delta_dp=1e-5)
    drowned = cc.estimate(noisy, delta_dp=1e-5)
    # Assert
    assert len(inserted) == int(cc.included.sum())
    assert clean["mu"] > 5 * drowned["mu"]
    assert drowned["epsilon_lower_bound"] <= drowned["epsilon_estimate"]
    assert drowned["mu"] < 0.5  # one step of z = 8: the true μ is 1/8
