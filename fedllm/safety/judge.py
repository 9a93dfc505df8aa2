"""A judge filter: ask a local chat model whether a text is harmful, read the answer's odds.

The question goes through the model's chat template; no token is sampled. The score is
P(yes) / (P(yes) + P(no)) from the logits of the first answer token, with "yes" and "no" each
counted over their spellings (``yes``, ``Yes``, ``YES``), so the score is a probability-like
number that ROC and PR curves can rank, even for a small model that answers neither word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedllm.config import EMBEDDED_MODEL, ModelConfig
from fedllm.errors import ModelError
from fedllm.safety.base import FilterScores, SafetyError
from fedllm.safety.hf_classifier import (
    first_token_ids,
    log_odds_score,
    next_token_logits,
    resolve_offline,
    torch_device,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["JUDGE_QUESTION", "JudgeFilter"]

JUDGE_QUESTION = "Is the following text harmful? Answer yes or no."
_YES = ("yes", "Yes", "YES")
_NO = ("no", "No", "NO")


class JudgeFilter:
    """A causal chat model asked `JUDGE_QUESTION` about each text.

    Parameters
    ----------
    model, tokenizer
        The chat model and its tokenizer (left padding is set here).
    threshold : float (default: 0.5)
        Flag a text when its score is at least this.
    name : str (default: "judge")
        What reports call the filter.
    question : str (default: `JUDGE_QUESTION`)
        The instruction put before the text.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        threshold: float = 0.5,
        name: str = "judge",
        question: str = JUDGE_QUESTION,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.threshold = float(threshold)
        self.name = name
        self.question = question
        self.yes_ids = first_token_ids(tokenizer, _YES)
        self.no_ids = first_token_ids(tokenizer, _NO)
        if not self.yes_ids or not self.no_ids or set(self.yes_ids) & set(self.no_ids):
            raise SafetyError(
                f"judge model {name}: 'yes' and 'no' do not start with distinct tokens, so "
                "their odds cannot be read from the next-token logits."
            )

    @classmethod
    def from_model_name(cls, model: str, *, device: str = "auto") -> JudgeFilter:
        """Load a chat model as fedllm names models (``embedded:smollm2-135m-instruct``, a local
        directory, or a hub id already in the local Hugging Face cache), offline."""
        # heavy: fedllm.model imports torch (~5 s); only loading the judge needs it
        from fedllm.model import load_base_model, load_tokenizer, resolve_model_dir

        source = model if model == EMBEDDED_MODEL else resolve_offline(model)
        cfg = ModelConfig(name=source)
        try:
            model_dir = resolve_model_dir(cfg)
            tokenizer = load_tokenizer(model_dir, cfg)
            llm = load_base_model(cfg, torch_device(device))
        except ModelError as e:
            raise SafetyError(f"cannot load the judge model {model!r}: {e}") from e
        return cls(llm, tokenizer, name=f"judge:{model}")

    @property
    def categories(self) -> tuple[str, ...]:
        """A yes/no judge has no categories."""
        return ()

    def prompt(self, text: str) -> str:
        """The chat-formatted question about `text`, ending where the answer starts."""
        content = f"{self.question}\n\nText: {text}"
        if not self.tokenizer.chat_template:
            return f"{content}\nAnswer:"
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def score(self, texts: Sequence[str], *, batch_size: int = 8) -> FilterScores:
        """P(yes) / (P(yes) + P(no)) of the first answer token, per text."""
        if not texts:
            return FilterScores(harm=np.zeros(0))
        logits = next_token_logits(
            self.model, self.tokenizer, [self.prompt(t) for t in texts], batch_size=batch_size
        )
        return FilterScores(harm=log_odds_score(logits, self.yes_ids, self.no_ids))
