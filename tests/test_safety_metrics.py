"""Tests for fedllm.safety.metrics: every metric against scikit-learn, and the bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from fedllm.safety.metrics import (
    METRICS,
    _weighted_metrics,
    auroc,
    average_precision,
    bootstrap_metrics,
    category_indices,
    confusion,
    metrics_at,
    pr_curve,
    roc_curve,
    threshold_at_fpr,
)

SEEDS = range(8)


def _random_set(seed: int, n: int = 80, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores rounded so that many tie, harmful scoring higher."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1).round(decimals)
    return labels, scores


def _sklearn_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    flagged = (scores >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(labels, flagged, labels=[0, 1]).ravel()
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, flagged, average="binary", zero_division=np.nan
    )
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "fpr": fp / (fp + tn),
        "fnr": fn / (fn + tp),
        "auroc": skm.roc_auc_score(labels, scores),
        "auprc": skm.average_precision_score(labels, scores),
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_average_precision_match_sklearn_with_ties(seed: int) -> None:
    """Tied scores count as sklearn counts them (half a pair for AUROC, one step for AP)."""
    # Prepare
    labels, scores = _random_set(seed)
    assert np.unique(scores).size < scores.size  # ties present

    # Execute / Assert
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_match_sklearn(seed: int) -> None:
    """Precision, recall, F1, FPR and FNR at a threshold equal sklearn's on `score >= t`."""
    # Prepare
    labels, scores = _random_set(seed)
    threshold = float(np.random.default_rng(seed).choice(scores))

    # Execute
    ours = metrics_at(labels, scores, threshold)
    counts = confusion(labels, scores, threshold)

    # Assert
    assert ours == pytest.approx(_sklearn_metrics(labels, scores, threshold), abs=1e-12)
    flagged = (scores >= threshold).astype(int)
    assert [counts.tn, counts.fp, counts.fn, counts.tp] == list(
        skm.confusion_matrix(labels, flagged).ravel()
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_curves_match_sklearn(seed: int) -> None:
    """ROC and PR curves have sklearn's points and thresholds, one per distinct score."""
    # Prepare
    labels, scores = _random_set(seed, decimals=2)

    # Execute
    fpr, tpr, roc_t = roc_curve(labels, scores)
    precision, recall, pr_t = pr_curve(labels, scores)

    # Assert
    sk_fpr, sk_tpr, sk_roc_t = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(roc_t, sk_roc_t)
    sk_precision, sk_recall, sk_pr_t = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, sk_precision)
    np.testing.assert_allclose(recall, sk_recall)
    np.testing.assert_array_equal(pr_t, sk_pr_t)


def test_resample_weights_give_the_metrics_of_the_repeated_texts() -> None:
    """A bootstrap resample (counts per text) is measured as if each text were repeated."""
    # Prepare
    labels, scores = _random_set(3, n=30)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=labels.size)
    counts[:2] = 1  # keep both classes
    pos, neg = labels == 1, labels == 0

    # Execute
    got = _weighted_metrics(
        scores[pos], scores[neg], counts[pos][None].astype(float), counts[neg][None], 0.5
    )

    # Assert
    repeated = _sklearn_metrics(np.repeat(labels, counts), np.repeat(scores, counts), 0.5)
    assert {k: float(v[0]) for k, v in got.items()} == pytest.approx(repeated, abs=1e-12)


@pytest.mark.parametrize(
    ("labels", "scores", "threshold", "expected"),
    [
        # nothing flagged: precision undefined, F1 and recall 0
        ([0, 1, 1], [0.1, 0.2, 0.3], 0.9, {"precision": math.nan, "recall": 0.0, "f1": 0.0}),
        # everything flagged
        ([0, 1, 1], [0.1, 0.2, 0.3], 0.0, {"precision": 2 / 3, "fpr": 1.0, "fnr": 0.0}),
        # perfect separation
        ([0, 0, 1], [0.1, 0.2, 0.3], 0.25, {"auroc": 1.0, "auprc": 1.0, "f1": 1.0}),
        # all scores tied: chance AUROC, AP = prevalence
        ([0, 1, 1, 0], [0.5] * 4, 0.5, {"auroc": 0.5, "auprc": 0.5, "fpr": 1.0}),
        # one class only: rank metrics and FPR undefined, no crash
        ([1, 1], [0.2, 0.7], 0.5, {"auroc": math.nan, "auprc": math.nan, "fpr": math.nan}),
        ([0, 0], [0.2, 0.7], 0.5, {"recall": math.nan, "fnr": math.nan, "precision": 0.0}),
        # empty
        ([], [], 0.5, {name: math.nan for name in METRICS}),
    ],
)
def test_edge_cases_are_defined_or_nan(
    labels: list[int], scores: list[float], threshold: float, expected: dict[str, float]
) -> None:
    """Each metric is NaN exactly when its denominator is zero, and agrees with sklearn
    (zero_division=nan) otherwise."""
    # Execute
    got = metrics_at(labels, scores, threshold)

    # Assert
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, nan_ok=True), name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [0.0, 0.05, 0.2, 0.5])
def test_threshold_at_fpr_meets_the_target_with_the_most_recall(seed: int, target: float) -> None:
    """The returned threshold's FPR is <= target, and the next lower distinct score breaks it."""
    # Prepare
    labels, scores = _random_set(seed, decimals=2)

    # Execute
    t = threshold_at_fpr(labels, scores, target)

    # Assert
    assert metrics_at(labels, scores, t)["fpr"] <= target
    lower = scores[scores < t]
    if lower.size:
        assert metrics_at(labels, scores, lower.max())["fpr"] > target
    sk_fpr, _, sk_t = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert t == sk_t[np.flatnonzero(sk_fpr <= target)[-1]] or t > scores.max()


def test_threshold_at_fpr_flags_nothing_when_a_benign_text_scores_highest() -> None:
    """If no observed score meets the target, the threshold sits just above the highest score."""
    # Execute
    t = threshold_at_fpr([0, 1, 0], [1.0, 0.8, 0.2], 0.1)

    # Assert
    assert t > 1.0
    assert confusion([0, 1, 0], [1.0, 0.8, 0.2], t).fp == 0
    assert math.isfinite(t)


@pytest.mark.parametrize(
    ("labels", "target", "match"),
    [([0, 1], 1.5, "target FPR must be in"), ([1, 1], 0.1, "needs at least one benign")],
)
def test_threshold_at_fpr_rejects_bad_input(labels: list[int], target: float, match: str) -> None:
    """A target outside [0, 1], or no benign label, is refused."""
    with pytest.raises(ValueError, match=match):
        threshold_at_fpr(labels, [0.2, 0.4], target)


def test_bootstrap_intervals_bracket_the_point_estimate() -> None:
    """Every interval contains its point estimate, which is the metric on the full data."""
    # Prepare
    labels, scores = _random_set(1, n=300, decimals=2)

    # Execute
    result = bootstrap_metrics(labels, scores, 0.5, resamples=500, seed=0)

    # Assert
    point = metrics_at(labels, scores, 0.5)
    for name in METRICS:
        iv = result[name]
        assert iv.value == pytest.approx(point[name])
        assert iv.ci_low <= iv.value <= iv.ci_high, name
        assert iv.ci_low < iv.ci_high, name


def test_bootstrap_is_reproducible_with_a_seed() -> None:
    """The same seed gives the same intervals; another seed gives others."""
    # Prepare
    labels, scores = _random_set(2, n=200, decimals=2)

    # Execute
    a = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=7)
    b = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=7)
    c = bootstrap_metrics(labels, scores, 0.5, resamples=300, seed=8)

    # Assert
    assert a == b
    assert a["auroc"] != c["auroc"]


def test_bootstrap_intervals_shrink_with_more_data() -> None:
    """Twenty times the data from the same distribution gives much narrower intervals."""
    # Prepare
    small = _random_set(4, n=100, decimals=3)
    large = _random_set(4, n=2000, decimals=3)

    # Execute
    a = bootstrap_metrics(*small, 0.5, resamples=400, seed=0)
    b = bootstrap_metrics(*large, 0.5, resamples=400, seed=0)

    # Assert
    for name in METRICS:
        assert b[name].ci_high - b[name].ci_low < 0.5 * (a[name].ci_high - a[name].ci_low), name


def test_bootstrap_is_stratified_so_auroc_is_always_defined() -> None:
    """With a single harmful text, every resample still has one: no undefined AUROC."""
    # Prepare
    labels = np.array([1] + [0] * 40)
    scores = np.linspace(0, 1, 41)[::-1]

    # Execute
    result = bootstrap_metrics(labels, scores, 0.5, resamples=200, seed=0)

    # Assert
    assert result["auroc"].value == 1.0
    assert (result["auroc"].ci_low, result["auroc"].ci_high) == (1.0, 1.0)
    assert result["recall"].ci_low == result["recall"].ci_high == 1.0


def test_bootstrap_of_undefined_metrics_is_nan_not_an_error() -> None:
    """Only harmful texts: FPR and AUROC are NaN with NaN intervals; recall still has one."""
    # Execute
    result = bootstrap_metrics([1, 1, 1], [0.2, 0.5, 0.9], 0.5, resamples=100, seed=0)

    # Assert
    assert math.isnan(result["fpr"].value) and math.isnan(result["fpr"].ci_low)
    assert math.isnan(result["auroc"].ci_high)
    assert result["recall"].value == pytest.approx(2 / 3)
    assert result["auroc"].as_dict() == {"value": None, "ci_low": None, "ci_high": None}


def test_zero_resamples_give_point_estimates_only() -> None:
    """`resamples=0` skips the bootstrap: values, NaN intervals."""
    # Execute
    result = bootstrap_metrics([0, 1], [0.2, 0.7], 0.5, resamples=0)

    # Assert
    assert result["auroc"].value == 1.0
    assert math.isnan(result["auroc"].ci_low)


def test_a_category_is_its_own_rows_plus_the_uncategorised_benign_rows() -> None:
    """Each category is measured on its harmful and look-alike rows plus the set's benign
    background (uncategorised benign rows), never on another category's rows."""
    # Prepare
    labels = [1, 1, 0, 0, 1, 0, 0]
    categories = ["weapons", "weapons", None, None, "drugs", "drugs", "weapons"]

    # Execute
    weapons = category_indices(labels, categories, "weapons")
    drugs = category_indices(labels, categories, "drugs")
    unknown = category_indices(labels, categories, "fraud")

    # Assert
    assert weapons.tolist() == [0, 1, 2, 3, 6]
    assert drugs.tolist() == [2, 3, 4, 5]
    assert unknown.tolist() == [2, 3]


def test_category_without_background_is_measured_on_its_own_rows() -> None:
    """With no uncategorised benign row, a category's rows are only its own."""
    # Execute
    rows = category_indices([1, 0, 1, 0], ["a", "a", "b", "b"], "a")

    # Assert
    assert rows.tolist() == [0, 1]
