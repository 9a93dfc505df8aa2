"""The response filter: judges an answer in the light of its prompt, as Llama Guard classifies
a conversation, with the offline sentence-embedding model and a logistic-regression head.

An answer alone says too little: "Mix the two and heat gently" is chemistry homework or a
weapon depending on what was asked, and a refusal mentions the harm it declines. So the head
reads the prompt's embedding p, the answer's a, and their elementwise product p*a (a linear
model cannot form the interaction itself): `pair_features`. It was trained on the bundled
answer set (`fedllm.safety.answers`), answers made and labelled by rule from the training
prompts; red-teaming toolkits' human-labelled answers are kept for testing it.

Single texts (a site's training examples, `fedllm safety eval` on prompts) are scored by the
bundled prompt head (`fedllm.safety.embedding`) over the same embedding model, so the prompt
side is exactly what it was.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedllm.safety.base import FilterScores, SafetyError
from fedllm.safety.embedding import EmbeddingFilter, fit_heads, fitting_context, training_info
from fedllm.safety.labelled import LabelledSet

__all__ = ["BUNDLED_RESPONSE_HEAD", "ResponseFilter", "pair_features", "train_response_filter"]

BUNDLED_RESPONSE_HEAD = Path(__file__).parent / "data" / "response-head"


def pair_features(prompts: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """[a, p*a, p] for unit-length prompt and answer embeddings, (n, 3d)."""
    p, a = np.asarray(prompts, dtype=np.float64), np.asarray(answers, dtype=np.float64)
    if p.shape != a.shape:
        raise SafetyError(f"{p.shape} prompt embeddings for {a.shape} answer embeddings.")
    return np.hstack([a, p * a, p])


class ResponseFilter(EmbeddingFilter):
    """A `PairFilter`: the pair head for (prompt, answer), the bundled prompt head for texts."""

    FORMAT = "fedllm-response-head"
    BUNDLED = BUNDLED_RESPONSE_HEAD
    EMBEDDINGS_PER_ROW = 3  # pair_features: [a, p*a, p]

    _text: EmbeddingFilter | None = None

    def _text_filter(self) -> EmbeddingFilter:
        if self._text is None:
            text = EmbeddingFilter.load(device=self.device, name=self.name)
            if text.embedder_sha256 != self.embedder_sha256:
                raise SafetyError(
                    f"response head {self.name} and the bundled prompt head were trained on "
                    "different embedding models; retrain the response head."
                )
            self._text = text
        return self._text

    def score(self, texts: Sequence[str], *, batch_size: int = 32) -> FilterScores:
        """Single texts: the bundled prompt head, over this filter's (shared) embeddings."""
        return self._text_filter().score_embeddings(self.embed(texts, batch_size=batch_size))

    def score_pairs(
        self, prompts: Sequence[str], answers: Sequence[str], *, batch_size: int = 32
    ) -> FilterScores:
        """Each answer judged with its prompt."""
        if len(prompts) != len(answers):
            raise SafetyError(f"{len(prompts)} prompts for {len(answers)} answers.")
        p = self.embed(prompts, batch_size=batch_size)
        a = self.embed(answers, batch_size=batch_size)
        return self.score_embeddings(pair_features(p, a))


def train_response_filter(
    data: LabelledSet,
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    embedder_dir: str | Path | None = None,
    batch_size: int = 64,
) -> ResponseFilter:
    """Embed the prompts and answers of `data`, fit the pair head, save it to `out_dir`.

    Parameters are those of `fedllm.safety.embedding.train_embedding_filter`; `data` must be a
    set of answers (``prompt,response,label``).
    """
    if data.prompts is None:
        raise SafetyError(
            f"labelled set {data.source} holds single texts; the response filter trains on "
            "answers with their prompts (prompt,response,label[,category])."
        )
    untrained, digest, embedder = fitting_context(data, ResponseFilter, device, embedder_dir)
    p = untrained.embed(data.prompts, batch_size=batch_size)
    a = untrained.embed(data.texts, batch_size=batch_size)
    heads = fit_heads(pair_features(p, a), data.labels, data.categories, seed=seed)
    pairs = "\n".join(f"{q}\t{r}" for q, r in zip(data.prompts, data.texts, strict=True))
    heads.info.update(training_info(data, seed))
    heads.info["pairs_sha256"] = hashlib.sha256(pairs.encode()).hexdigest()
    heads.info["features"] = "[answer, prompt*answer, prompt] of unit-length embeddings"
    trained = ResponseFilter(heads, embedder_dir=embedder, embedder_sha256=digest, device=device)
    trained._model = untrained._model  # already loaded and checked
    if out_dir is not None:
        trained.save(out_dir)
    return trained
