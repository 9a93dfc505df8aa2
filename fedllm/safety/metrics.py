"""Metric maths for safety filters: threshold metrics, ROC and PR curves, AUROC, average
precision, the threshold meeting a target FPR, and stratified bootstrap confidence intervals.

Pure numpy; no I/O. Labels are 0/1 with 1 = harmful, scores are harm scores, and a text is
flagged when ``score >= threshold``. Every metric is NaN exactly when its
denominator is zero (precision with nothing flagged, recall/FNR without harmful rows, FPR without
benign rows, AUROC/AUPRC without both classes), never a crash and never a silent 0.

The definitions are scikit-learn's (``precision_recall_fscore_support``, ``roc_auc_score`` with
its tie handling, ``average_precision_score``, ``roc_curve``, ``precision_recall_curve``), and
the tests check them against it. They are written by hand, vectorised over resamples, because a
bootstrap calls them thousands of times and scikit-learn's per-call input validation makes that
slow: 1000 stratified resamples of 1207 texts took 38 s through sklearn's four calls and 0.16 s
here (2 shared CPU cores, Nov 2026).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "Confusion",
    "Interval",
    "auroc",
    "average_precision",
    "bootstrap_metrics",
    "category_indices",
    "confusion",
    "metrics_at",
    "pr_curve",
    "roc_curve",
    "threshold_at_fpr",
]

METRICS = ("precision", "recall", "f1", "fpr", "fnr", "auroc", "auprc")
# Bootstrap resamples are processed in chunks of at most this many scores, to bound memory.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold: flagged harmful (tp), flagged benign (fp), passed benign (tn),
    passed harmful (fn)."""

    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval (NaN where undefined)."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float | None]:
        """JSON-able: NaN becomes None."""
        return {k: None if math.isnan(v) else float(v) for k, v in vars(self).items()}


def _check(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of one length, got {y.shape}, {s.shape}.")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1.")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite.")
    return y.astype(np.int64), s


def _ratio(num: np.ndarray, den: np.ndarray | int) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _grouped(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct scores in decreasing order, and the index in it of each harmful and each
    benign score (tied scores share an index)."""
    distinct = np.unique(np.r_[pos, neg])[::-1]
    return distinct, np.searchsorted(-distinct, -pos), np.searchsorted(-distinct, -neg)


def _per_group(weights: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum the (B, n) weights of texts sharing a score: a (B, n_groups) matrix."""
    out = np.zeros((weights.shape[0], n_groups))
    if groups.size:
        order = np.argsort(groups, kind="stable")
        sorted_groups = groups[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
        out[:, sorted_groups[starts]] = np.add.reduceat(weights[:, order], starts, axis=1)
    return out


def _weighted_metrics(
    pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Every metric in `METRICS`, once per row of the weights.

    `w_pos` (B, P) and `w_neg` (B, N) say how often each harmful and benign text counts: all
    ones for the data itself, and the multinomial counts of a resample with replacement for a
    bootstrap resample. Working on counts per distinct score, rather than re-sorting each
    resample, makes a thousand resamples cost about as much as a handful of sorts.

    With P_g, N_g the harmful and benign counts at the g-th highest distinct score, and TP_g,
    FP_g their running sums (the counts flagged at that threshold):
    AUROC = sum_g P_g (N_below_g + N_g / 2) / (P N): the Mann-Whitney statistic, a tie counting
    one half, which equals the trapezoidal area ``roc_auc_score`` integrates;
    AUPRC = sum_g (P_g / P) TP_g / (TP_g + FP_g): ``average_precision_score``'s sum of recall
    steps times precision.
    """
    distinct, g_pos, g_neg = _grouped(pos, neg)
    p_g = _per_group(w_pos, g_pos, distinct.size)
    n_g = _per_group(w_neg, g_neg, distinct.size)
    n_pos, n_neg = p_g.sum(axis=1), n_g.sum(axis=1)
    tp_g, fp_g = np.cumsum(p_g, axis=1), np.cumsum(n_g, axis=1)
    below = n_neg[:, None] - fp_g
    auc = _ratio((p_g * (below + n_g / 2)).sum(axis=1), n_pos * n_neg)
    precision_g = _ratio(tp_g, tp_g + fp_g)
    # sklearn scores AP 1.0 without benign rows; here it is undefined like AUROC (see above).
    ap = _ratio(np.where(p_g > 0, p_g * precision_g, 0.0).sum(axis=1), n_pos * (n_neg > 0))
    flagged = distinct >= threshold
    tp, fp = p_g[:, flagged].sum(axis=1), n_g[:, flagged].sum(axis=1)
    fn = n_pos - tp
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, n_pos),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fpr": _ratio(fp, n_neg),
        "fnr": _ratio(fn, n_pos),
        "auroc": auc,
        "auprc": ap,
    }


def _point_metrics(pos: np.ndarray, neg: np.ndarray, threshold: float) -> dict[str, float]:
    ones = _weighted_metrics(pos, neg, np.ones((1, pos.size)), np.ones((1, neg.size)), threshold)
    return {k: float(v[0]) for k, v in ones.items()}


def _split(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y, s = _check(labels, scores)
    return s[y == 1], s[y == 0]


def confusion(labels: Any, scores: Any, threshold: float) -> Confusion:
    """Confusion counts when texts with ``score >= threshold`` are flagged."""
    pos, neg = _split(labels, scores)
    tp, fp = int((pos >= threshold).sum()), int((neg >= threshold).sum())
    return Confusion(tp=tp, fp=fp, tn=neg.size - fp, fn=pos.size - tp)


def metrics_at(labels: Any, scores: Any, threshold: float) -> dict[str, float]:
    """Precision, recall, F1, FPR, FNR at `threshold`, and AUROC, AUPRC (threshold-free).

    Parameters
    ----------
    labels : array_like
        0/1 labels, 1 = harmful.
    scores : array_like
        Harm scores, one per label.
    threshold : float
        Flag texts with ``score >= threshold``.

    Returns
    -------
    dict[str, float]
        One value per name in `METRICS`; NaN where its denominator is zero.
    """
    pos, neg = _split(labels, scores)
    return _point_metrics(pos, neg, threshold)


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, ties as in ``sklearn.metrics.roc_auc_score``; NaN with one
    class."""
    pos, neg = _split(labels, scores)
    return _point_metrics(pos, neg, 0.5)["auroc"]


def average_precision(labels: Any, scores: Any) -> float:
    """Area under the PR curve as ``sklearn.metrics.average_precision_score`` defines it (no
    interpolation); NaN with one class."""
    pos, neg = _split(labels, scores)
    return _point_metrics(pos, neg, 0.5)["auprc"]


def _counts_by_threshold(
    labels: Any, scores: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct scores in decreasing order with the tp and fp counts when flagging at each."""
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[last_of_each]
    fps = last_of_each + 1 - tps
    return s[last_of_each], tps, fps, int(y.sum()), int(y.size - y.sum())


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds at every distinct score, as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)`` returns them: decreasing thresholds, starting at (0, 0) with
    threshold +inf (nothing flagged). NaN rates when a class is missing."""
    thresholds, tps, fps, n_pos, n_neg = _counts_by_threshold(labels, scores)
    fpr = np.r_[0.0 if n_neg else np.nan, _ratio(fps, n_neg)]
    tpr = np.r_[0.0 if n_pos else np.nan, _ratio(tps, n_pos)]
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and thresholds as ``sklearn.metrics.precision_recall_curve`` returns
    them: increasing thresholds, then a last point (precision 1, recall 0) without a threshold.
    Recall is NaN when there is no harmful row."""
    thresholds, tps, fps, n_pos, _ = _counts_by_threshold(labels, scores)
    precision = _ratio(tps, tps + fps)
    recall = _ratio(tps, n_pos)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def threshold_at_fpr(labels: Any, scores: Any, target: float) -> float:
    """The lowest threshold whose FPR is at most `target`.

    Among thresholds meeting the FPR target, the lowest one flags the most harmful texts
    (recall only falls as the threshold rises), so it is the operating point to report. The
    value returned is an observed score (any threshold between it and the next lower distinct
    score flags the same texts). When even the highest score gives too high an FPR (a benign
    text scores highest and `target` is below the share of benign texts at that score), only
    flagging nothing meets the target: then the next float above the highest score is returned,
    so ``score >= threshold`` is false for every text.

    Parameters
    ----------
    labels : array_like
        0/1 labels, 1 = harmful; at least one benign label.
    scores : array_like
        Harm scores.
    target : float
        The largest acceptable false-positive rate, in [0, 1].

    Returns
    -------
    float
        The threshold.

    Raises
    ------
    ValueError
        If `target` is outside [0, 1] or there is no benign label (FPR undefined).
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"The target FPR must be in [0, 1], got {target}.")
    thresholds, _, fps, _, n_neg = _counts_by_threshold(labels, scores)
    if n_neg == 0:
        raise ValueError("A threshold at a target FPR needs at least one benign (0) label.")
    # fps grows as the threshold falls, so the rows meeting the target are a prefix.
    meeting = np.flatnonzero(fps / n_neg <= target)
    if meeting.size:
        return float(thresholds[meeting[-1]])
    return float(np.nextafter(thresholds[0], np.inf))


def _resample_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """How often each of `n` texts is drawn in `rows` resamples of size `n` with replacement."""
    if n == 0:
        return np.zeros((rows, 0))
    draws = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def bootstrap_metrics(
    labels: Any,
    scores: Any,
    threshold: float,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Interval]:
    """Every metric in `METRICS` at `threshold`, with a percentile bootstrap confidence interval.

    Resampling is stratified by class: each resample draws the harmful texts with replacement
    from the harmful ones and the benign from the benign, keeping the counts, so every resample
    has both classes (whenever the data does) and AUROC is always defined. Resamples where a
    metric is undefined (e.g. precision with nothing flagged) are left out of its interval.

    Parameters
    ----------
    labels, scores : array_like
        0/1 labels (1 = harmful) and harm scores.
    threshold : float
        Flag texts with ``score >= threshold``.
    resamples : int
        Bootstrap resamples (default: 1000); 0 gives NaN intervals.
    seed : int
        Seed of the resampling, so intervals are reproducible (default: 0).
    confidence : float
        Coverage of the interval (default: 0.95).

    Returns
    -------
    dict[str, Interval]
        Point estimate on the full data and interval, per metric.
    """
    if resamples < 0:
        raise ValueError(f"The number of bootstrap resamples must be >= 0, got {resamples}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"The confidence must be in (0, 1), got {confidence}.")
    pos, neg = _split(labels, scores)
    point = _point_metrics(pos, neg, threshold)
    if resamples == 0:
        return {k: Interval(v, math.nan, math.nan) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, pos.size + neg.size))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        parts.append(
            _weighted_metrics(
                pos,
                neg,
                _resample_counts(rng, pos.size, rows),
                _resample_counts(rng, neg.size, rows),
                threshold,
            )
        )
    tail = (1.0 - confidence) / 2 * 100
    out = {}
    for name, value in point.items():
        samples = np.concatenate([p[name] for p in parts])
        with warnings.catch_warnings():  # an all-NaN metric is undefined, as documented
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanpercentile(samples, [tail, 100 - tail])
        out[name] = Interval(value, float(low), float(high))
    return out


def category_indices(labels: Any, categories: Sequence[str | None], category: str) -> np.ndarray:
    """The rows that measure `category`: its own rows (harmful ones, and benign ones that only
    sound like it) plus every uncategorised benign row of the set, in set order.

    A category's harmful rows are told apart from the same benign background as the whole set,
    so FPR, AUROC and AUPRC are defined even for a category with only harmful rows, and do not
    rest on the handful of look-alike benign rows a category may have of its own (their FPR
    alone is `lookalike rows` in the evaluation). A set without uncategorised benign rows
    measures each category on its own rows only.
    """
    y = np.asarray(labels)
    cats = list(categories)
    if len(cats) != y.size:
        raise ValueError(f"categories ({len(cats)}) and labels ({y.size}) differ in length.")
    own = np.array([c == category for c in cats], dtype=bool)
    background = np.array([c is None for c in cats], dtype=bool) & (y == 0)
    return np.flatnonzero(own | background)
