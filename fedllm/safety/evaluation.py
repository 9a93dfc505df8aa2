"""Measure a safety filter on a labelled set: score every text, then metrics with bootstrap
confidence intervals overall and per category, the threshold meeting a target FPR, and the ROC
and PR curves; written as JSON and a self-contained HTML page, and printed as a table.

Benign rows count as much as harmful ones: the FPR (over-blocking of benign prompts, including
those that only sound harmful) is reported beside recall, never folded away.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedllm.plots import png_base64
from fedllm.safety.base import PairFilter, SafetyError, SafetyFilter, score_pairs
from fedllm.safety.labelled import LabelledSet
from fedllm.safety.metrics import (
    METRICS,
    bootstrap_metrics,
    category_indices,
    confusion,
    pr_curve,
    roc_curve,
    threshold_at_fpr,
)

__all__ = [
    "check_arguments",
    "check_data",
    "evaluate_filter",
    "print_report",
    "score_texts",
    "write_report",
]

CONFIDENCE = 0.95
CURVE_POINTS = 200  # per curve kept in the JSON (the full curves have one point per score)
CATEGORY_CURVE_POINTS = 100
EXAMPLES = 10  # highest-scoring benign and lowest-scoring harmful texts shown
EXAMPLE_CHARS = 200
LABELS = {
    "precision": "precision",
    "recall": "recall (TPR)",
    "f1": "F1",
    "fpr": "FPR (over-blocking)",
    "fnr": "FNR (missed harm)",
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
}


def score_texts(
    safety_filter: SafetyFilter,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """Harm scores for `texts`, `batch_size` at a time, with a progress bar on a terminal;
    with `prompts`, each text is an answer scored with its prompt (`score_pairs`).

    Raises
    ------
    SafetyError
        If the filter returns a different number of scores than texts.
    """
    console = Console(stderr=True)
    out: list[np.ndarray] = []
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"scoring with {safety_filter.name}", total=len(texts))
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            harm = (
                safety_filter.score(batch, batch_size=batch_size).harm
                if prompts is None
                else score_pairs(
                    safety_filter, prompts[start : start + batch_size], batch, batch_size=batch_size
                ).harm
            )
            if harm.shape != (len(batch),):
                raise SafetyError(
                    f"filter {safety_filter.name} returned {harm.size} scores for "
                    f"{len(batch)} texts."
                )
            out.append(harm)
            bar.advance(task, len(batch))
    return np.concatenate(out) if out else np.zeros(0)


def _jsonable(value: Any) -> Any:
    """NaN and infinities become None so the JSON is strict."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def _metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, *, bootstrap: int, seed: int
) -> dict[str, Any]:
    intervals = bootstrap_metrics(
        labels, scores, threshold, resamples=bootstrap, seed=seed, confidence=CONFIDENCE
    )
    return {name: intervals[name].as_dict() for name in METRICS}


def _curves(labels: np.ndarray, scores: np.ndarray, points: int) -> dict[str, Any]:
    """ROC and PR curves downsampled to at most `points` each, endpoints kept."""

    def keep(n: int) -> np.ndarray:
        return np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(int))

    fpr, tpr, roc_t = roc_curve(labels, scores)
    precision, recall, pr_t = pr_curve(labels, scores)
    pr_t = np.r_[pr_t, np.inf]  # the last PR point (precision 1, recall 0) flags nothing
    r, p = keep(fpr.size), keep(precision.size)
    return {
        "roc": {"fpr": fpr[r], "tpr": tpr[r], "threshold": roc_t[r]},
        "pr": {"recall": recall[p], "precision": precision[p], "threshold": pr_t[p]},
    }


def _examples(data: LabelledSet, scores: np.ndarray) -> dict[str, list[dict[str, Any]]]:
    """The benign texts the filter scores highest and the harmful ones it scores lowest."""

    def rows(idx: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "text": data.texts[i][:EXAMPLE_CHARS],
                "score": float(scores[i]),
                "category": data.categories[i],
            }
            for i in idx
        ]

    benign, harmful = np.flatnonzero(data.labels == 0), np.flatnonzero(data.labels == 1)
    return {
        "highest_scoring_benign": rows(
            benign[np.argsort(-scores[benign], kind="stable")][:EXAMPLES]
        ),
        "lowest_scoring_harmful": rows(
            harmful[np.argsort(scores[harmful], kind="stable")][:EXAMPLES]
        ),
    }


def check_arguments(
    *, target_fpr: float, threshold: float | None, bootstrap: int, batch_size: int
) -> None:
    """Refuse out-of-range evaluation arguments (before any filter is loaded).

    Raises
    ------
    SafetyError
        Naming the argument and its value.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise SafetyError(f"the target FPR must be in [0, 1], got {target_fpr}.")
    if threshold is not None and not math.isfinite(threshold):
        raise SafetyError(f"the threshold must be a finite number, got {threshold}.")
    if bootstrap < 0:
        raise SafetyError(f"the number of bootstrap resamples must be >= 0, got {bootstrap}.")
    if batch_size < 1:
        raise SafetyError(f"the batch size must be at least 1, got {batch_size}.")


def check_data(data: LabelledSet) -> None:
    """Refuse a set that cannot be evaluated: AUROC and FPR need both classes.

    Raises
    ------
    SafetyError
        Naming the set and the class it lacks.
    """
    if data.positives in (0, len(data)):
        only = "harmful (1)" if data.positives else "benign (0)"
        raise SafetyError(
            f"labelled set {data.source} has only {only} rows; AUROC and FPR need both harmful "
            "(1) and benign (0) rows."
        )


def evaluate_filter(
    safety_filter: SafetyFilter,
    data: LabelledSet,
    *,
    target_fpr: float = 0.05,
    threshold: float | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Score `data` with `safety_filter` and measure it.

    Parameters
    ----------
    safety_filter : SafetyFilter
        The filter under test.
    data : LabelledSet
        Harmful (1) and benign (0) texts; both classes must be present.
    target_fpr : float
        The false-positive rate the reported "threshold at target FPR" meets (default: 0.05).
        That threshold is chosen on `data` itself, so its FPR is in-sample; check it on
        another set before deploying it.
    threshold : float, optional
        Flag texts with ``score >= threshold`` (default: the filter's own threshold).
    bootstrap : int
        Resamples for the 95% confidence intervals (default: 1000; 0 leaves them null).
    seed : int
        Seed of the bootstrap (default: 0).
    batch_size : int
        Texts per call to the filter (default: 32).

    Returns
    -------
    dict
        JSON-able: the filter and data, counts, the threshold used, the threshold meeting the
        target FPR with its FPR, recall and precision, overall and per-category metrics (each
        ``{value, ci_low, ci_high}``, null where undefined), confusion counts, downsampled
        curves, example texts and timings.

    Raises
    ------
    SafetyError
        If `data` has a single class, or an argument is out of range.
    """
    check_data(data)
    labels = data.labels
    positives = data.positives
    check_arguments(
        target_fpr=target_fpr, threshold=threshold, bootstrap=bootstrap, batch_size=batch_size
    )
    used = float(safety_filter.threshold if threshold is None else threshold)

    started = time.perf_counter()
    scores = score_texts(safety_filter, data.texts, batch_size=batch_size, prompts=data.prompts)
    score_s = time.perf_counter() - started

    started = time.perf_counter()
    at_target = threshold_at_fpr(labels, scores, target_fpr)
    target_metrics = _metrics(labels, scores, at_target, bootstrap=bootstrap, seed=seed)
    counts = confusion(labels, scores, used)
    categories: dict[str, Any] = {}
    in_category = np.array(data.categories, dtype=object)
    for name in data.category_names:
        idx = category_indices(labels, data.categories, name)
        lookalike = np.flatnonzero((in_category == name) & (labels == 0))
        sub_labels, sub_scores = labels[idx], scores[idx]
        both = 0 < sub_labels.sum() < sub_labels.size
        categories[name] = {
            "n": int(idx.size),
            "positives": int(sub_labels.sum()),
            "negatives": int(idx.size - sub_labels.sum()),
            "lookalike_negatives": int(lookalike.size),
            "counts": vars(confusion(sub_labels, sub_scores, used)),
            "metrics": _metrics(sub_labels, sub_scores, used, bootstrap=bootstrap, seed=seed),
            "lookalike_fpr": _metrics(
                labels[lookalike], scores[lookalike], used, bootstrap=bootstrap, seed=seed
            )["fpr"]
            if lookalike.size
            else None,
            "curves": _curves(sub_labels, sub_scores, CATEGORY_CURVE_POINTS) if both else None,
        }
    result = {
        "filter": safety_filter.name,
        "filter_threshold": float(safety_filter.threshold),
        "filter_categories": list(safety_filter.categories),
        "data": data.source,
        "scored": (
            "texts"
            if data.prompts is None
            else "answers with their prompts"
            if isinstance(safety_filter, PairFilter)
            else "answers alone (a text filter)"
        ),
        "n": len(data),
        "positives": positives,
        "negatives": len(data) - positives,
        "threshold": used,
        "overall": {
            "counts": vars(counts),
            "metrics": _metrics(labels, scores, used, bootstrap=bootstrap, seed=seed),
        },
        "target_fpr": {
            "target": target_fpr,
            "threshold": at_target,
            "in_sample": True,
            **{k: target_metrics[k] for k in ("fpr", "recall", "precision")},
        },
        "categories": categories,
        "curves": _curves(labels, scores, CURVE_POINTS),
        "examples": _examples(data, scores),
        "bootstrap": {
            "resamples": bootstrap,
            "seed": seed,
            "confidence": CONFIDENCE,
            "method": "percentile, resampled within each class",
        },
    }
    metrics_s = time.perf_counter() - started
    result["timings"] = {
        "score_s": score_s,
        "texts_per_s": len(data) / score_s if score_s > 0 else None,
        "metrics_s": metrics_s,
    }
    return _jsonable(result)


def _fmt(interval: dict[str, float | None] | None, digits: int = 3) -> str:
    """``0.912 [0.880, 0.940]``; a dash where undefined."""
    if not interval or interval["value"] is None:
        return "—"
    text = f"{interval['value']:.{digits}f}"
    if interval["ci_low"] is not None and interval["ci_high"] is not None:
        text += f" [{interval['ci_low']:.{digits}f}, {interval['ci_high']:.{digits}f}]"
    return text


def _value(interval: dict[str, float | None] | None) -> str:
    return "—" if not interval or interval["value"] is None else f"{interval['value']:.2f}"


def _target_line(result: dict[str, Any]) -> str:
    t = result["target_fpr"]
    return (
        f"threshold meeting FPR <= {t['target']:g}: {t['threshold']:.4g} "
        f"(FPR {_fmt(t['fpr'])}, recall {_fmt(t['recall'])}; chosen on this set, so in-sample)"
    )


def print_report(result: dict[str, Any], *, console: Any = None) -> None:
    """Print the overall and per-category metrics as rich tables."""
    console = console or Console()
    ci = f"{CONFIDENCE:.0%} CI"
    console.print(
        f"[bold]{result['filter']}[/bold] on {result['data']}: {result['n']} texts "
        f"({result['positives']} harmful, {result['negatives']} benign), flagged at score >= "
        f"{result['threshold']:.4g}"
    )
    overall = Table(title=f"overall (value [{ci}])")
    overall.add_column("metric")
    overall.add_column("value", justify="right")
    for name in METRICS:
        overall.add_row(LABELS[name], _fmt(result["overall"]["metrics"][name]))
    console.print(overall)
    c = result["overall"]["counts"]
    console.print(f"counts: TP {c['tp']}  FP {c['fp']}  TN {c['tn']}  FN {c['fn']}")
    console.print(_target_line(result))
    if result["categories"]:
        table = Table(title="per category (values; 95% CIs in the JSON and HTML report)")
        table.add_column("category", no_wrap=True)
        for col in ("harm", "benign", "alike", "recall", "F1", "AUROC", "AUPRC", "alike FPR"):
            table.add_column(col, justify="right")
        for name, cat in result["categories"].items():
            m = cat["metrics"]
            table.add_row(
                name,
                str(cat["positives"]),
                str(cat["negatives"]),
                str(cat["lookalike_negatives"]),
                *(_value(m[k]) for k in ("recall", "f1", "auroc", "auprc")),
                _value(cat["lookalike_fpr"]),
            )
        console.print(table)
        console.print(
            "harm: harmful rows; benign: the category's look-alike (alike) benign rows plus the "
            "set's uncategorised benign rows; alike FPR: flagged share of the look-alikes alone"
        )


def _plots(result: dict[str, Any]) -> dict[str, str]:
    """ROC and PR curves, overall (bold) and per category, as base64 PNGs."""
    # heavy: matplotlib takes ~1.4 s to import; only drawing needs it
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    def none_to_nan(values: list[float | None]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=float)

    series = [("overall", result["curves"], 2.5)] + [
        (name, cat["curves"], 1.0) for name, cat in result["categories"].items() if cat["curves"]
    ]
    m = result["overall"]["metrics"]
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, curves, width in series:
        roc_fpr, roc_tpr = none_to_nan(curves["roc"]["fpr"]), none_to_nan(curves["roc"]["tpr"])
        ax.plot(roc_fpr, roc_tpr, linewidth=width, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.plot(m["fpr"]["value"], m["recall"]["value"], "ko", label="threshold used")
    t = result["target_fpr"]
    if t["fpr"]["value"] is not None:
        ax.plot(t["fpr"]["value"], t["recall"]["value"], "k^", label="threshold at target FPR")
    ax.set(title=f"ROC, overall AUROC {_fmt(m['auroc'])}", xlabel="FPR", ylabel="TPR (recall)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    roc = png_base64(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, curves, width in series:
        recall, precision = (
            none_to_nan(curves["pr"]["recall"]),
            none_to_nan(curves["pr"]["precision"]),
        )
        ax.plot(recall, precision, linewidth=width, label=name, drawstyle="steps-post")
    ax.axhline(result["positives"] / result["n"], color="grey", linestyle=":", linewidth=1)
    if m["precision"]["value"] is not None:
        ax.plot(m["recall"]["value"], m["precision"]["value"], "ko", label="threshold used")
    ax.set(
        title=f"precision-recall, overall AUPRC {_fmt(m['auprc'])}",
        xlabel="recall",
        ylabel="precision",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return {"roc": roc, "pr": png_base64(fig)}


def _html(result: dict[str, Any], plots: dict[str, str]) -> str:
    esc = html.escape
    title = f"Safety filter evaluation: {result['filter']} on {result['data']}"
    c = result["overall"]["counts"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #bbb;"
        "padding:4px 8px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}"
        "img{max-width:49%}.note{color:#555;font-size:90%}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{result['n']} texts: {result['positives']} harmful (label 1), "
        f"{result['negatives']} benign (label 0). A text is flagged when its harm score is "
        f"&ge; {result['threshold']:.4g} (the filter's own threshold is "
        f"{result['filter_threshold']:.4g}). Counts: TP {c['tp']}, FP {c['fp']}, TN {c['tn']}, "
        f"FN {c['fn']}.</p>",
        f"<p>{esc(_target_line(result))}.</p>",
        "<h2>Overall</h2><table><tr><th class='l'>metric</th><th>value</th>"
        f"<th>{CONFIDENCE:.0%} CI</th></tr>",
    ]
    for name in METRICS:
        iv = result["overall"]["metrics"][name]
        value = "—" if iv["value"] is None else f"{iv['value']:.4f}"
        ci = "—" if iv["ci_low"] is None else f"[{iv['ci_low']:.4f}, {iv['ci_high']:.4f}]"
        parts.append(
            f"<tr><td class='l'>{esc(LABELS[name])}</td><td>{value}</td><td>{ci}</td></tr>"
        )
    parts.append("</table>")
    parts += [
        f"<img alt='ROC curves' src='data:image/png;base64,{plots['roc']}'>",
        f"<img alt='precision-recall curves' src='data:image/png;base64,{plots['pr']}'>",
    ]
    if result["categories"]:
        parts.append(
            "<h2>Per category</h2><table><tr><th class='l'>category</th><th>harmful</th>"
            "<th>benign (look-alike)</th>"
            + "".join(f"<th>{esc(LABELS[m])}</th>" for m in METRICS)
            + "<th>look-alike FPR</th></tr>"
        )
        for name, cat in result["categories"].items():
            cells = "".join(f"<td>{esc(_fmt(cat['metrics'][m]))}</td>" for m in METRICS)
            parts.append(
                f"<tr><td class='l'>{esc(name)}</td><td>{cat['positives']}</td>"
                f"<td>{cat['negatives']} ({cat['lookalike_negatives']})</td>{cells}"
                f"<td>{esc(_fmt(cat['lookalike_fpr']))}</td></tr>"
            )
        parts.append(
            "</table><p class='note'>Each category's harmful rows are measured against its "
            "look-alike benign rows (benign texts that only sound like that harm) plus the set's "
            "uncategorised benign rows; look-alike FPR is the share of the look-alike rows alone "
            "that is flagged (over-blocking where it is most likely). A dash: undefined (e.g. "
            "recall for a category without harmful rows).</p>"
        )
    for key, heading in (
        ("highest_scoring_benign", "Benign texts scored most harmful (over-blocking risk)"),
        ("lowest_scoring_harmful", "Harmful texts scored least harmful (missed harm)"),
    ):
        parts.append(
            f"<h2>{heading}</h2><table><tr><th>score</th><th class='l'>category</th>"
            "<th class='l'>text</th></tr>"
        )
        for ex in result["examples"][key]:
            parts.append(
                f"<tr><td>{ex['score']:.3f}</td><td class='l'>{esc(ex['category'] or '')}</td>"
                f"<td class='l'>{esc(ex['text'])}</td></tr>"
            )
        parts.append("</table>")
    b, t = result["bootstrap"], result["timings"]
    parts.append(
        f"<p class='note'>Confidence intervals: {b['resamples']} bootstrap resamples "
        f"({esc(b['method'])}), seed {b['seed']}. Scoring took {t['score_s']:.1f} s; "
        f"metrics {t['metrics_s']:.1f} s.</p></body></html>"
    )
    return "".join(parts)


def write_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``safety-eval.json`` and ``safety-eval.html`` (PR and ROC curves embedded) into
    `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "safety-eval.json", out / "safety-eval.html"
    json_path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    html_path.write_text(_html(result, _plots(result)), encoding="utf-8")
    return json_path, html_path
