"""Filters backed by Hugging Face models, loaded strictly offline: a sequence classifier, and a
guard LLM prompted Llama Guard style (arXiv 2312.06674).

Which labels of a classifier mean harm (`harmful_label_ids`): the ones named on the spec
(``hf:MODEL#toxic,threat``) when given; otherwise every label of ``config.id2label`` whose name
does not look safe (``safe``, ``benign``, ``neutral``, ``normal``, ``clean``, ``ok``,
``non-toxic``, ``not_hate``, ``LABEL_0``, ... see `SAFE_LABEL`). A single-label model scores
harm = sum of the softmax probabilities of the harmful labels; a multi-label one
(``problem_type="multi_label_classification"``) scores the largest sigmoid among them. With more
than one harmful label, each is a category.

A guard LLM answers ``safe`` or ``unsafe`` then a line of category codes (``S1,S10``). Its harm
score is P(unsafe) / (P(unsafe) + P(safe)) from the first answer token's logits (so ROC and PR
curves work); for texts it flags, the category line is generated greedily after a forced
``unsafe\\n`` and parsed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedllm.safety.base import FilterScores, SafetyError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LLAMA_GUARD_3_CATEGORIES",
    "SAFE_LABEL",
    "GuardFilter",
    "HFClassifierFilter",
    "first_token_ids",
    "guard_category_scores",
    "guard_prompt",
    "harmful_label_ids",
    "log_odds_score",
    "next_token_logits",
    "parse_guard_output",
    "resolve_offline",
    "torch_device",
]

SAFE_LABEL = re.compile(
    r"^(?:safe|benign|neutral|normal|clean|ok|okay|acceptable|appropriate|none|label_0|0"
    r"|non[-_ ]?(?:toxic|harmful|hate|hateful|offensive|violent|injection|jailbreak)"
    r"|not[-_ ]?(?:toxic|harmful|hate|hateful|offensive|violent|unsafe)"
    r"|no[-_ ]?(?:hate|harm|toxicity))$",
    re.IGNORECASE,
)

# Llama Guard 3's hazard taxonomy (MLCommons), used when the guard model's chat template does
# not carry its own category list, and to name the codes it answers with.
LLAMA_GUARD_3_CATEGORIES = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
_NATIVE_GUARD = re.compile(r"unsafe content categories", re.IGNORECASE)


def resolve_offline(ref: str) -> str:
    """The local folder `ref` loads from without a network: `ref` itself when it is a model
    folder, or its snapshot in the local Hugging Face cache when it is a hub id already
    downloaded; otherwise raise `SafetyError` naming it.

    Returning a folder (never the hub id) means no loader can reach for the network.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SafetyError(
                f"model directory {path} has no config.json; point at a folder saved with "
                "save_pretrained."
            )
        return str(path)
    if not ref.startswith(("/", "./", "../", "~")):
        # heavy: huggingface_hub's hub client (httpx) takes ~0.7 s to import; only a hub id needs it
        from huggingface_hub import snapshot_download

        try:
            snapshot = Path(snapshot_download(ref, local_files_only=True))
        except (OSError, ValueError):  # not cached, or not a valid repo id either
            snapshot = None
        if snapshot is not None and (snapshot / "config.json").is_file():
            return str(snapshot)
    raise SafetyError(
        f"model {ref!r} is neither a local directory nor in the local Hugging Face cache; "
        "download it on a connected machine (`hf download ID`) or pass a local path."
    )


def torch_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; asking for CUDA without one is an error."""
    # heavy: fedllm.model imports torch (~5 s); only placing a model needs it
    from fedllm.model import pick_device

    if requested not in ("auto", "cpu", "cuda"):
        raise SafetyError(f"device {requested!r} is not one of auto, cpu, cuda.")
    return pick_device(requested, setting="a safety filter's device")


def _dtype(device: torch.device) -> torch.dtype:
    # heavy: torch takes ~5 s to import; only placing a model needs it
    import torch

    # bf16 halves memory and is fast on CUDA; on CPU it is slow and less exact.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_tokenizer(ref: str, *, padding_side: str) -> PreTrainedTokenizerBase:
    # heavy: transformers takes ~3 s to import; only loading a model needs it
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafetyError(f"cannot load the tokenizer of model {ref!r} offline ({e}).") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _load_offline(
    ref: str, auto_class: Any, kind: str, padding_side: str, device: str
) -> tuple[Any, PreTrainedTokenizerBase]:
    """`ref`'s model (as `auto_class`, placed on `device`, bf16 on CUDA) and tokenizer, from
    local files only; a model that is not there offline is a `SafetyError` naming it."""
    source = resolve_offline(ref)
    dev = torch_device(device)
    tokenizer = _load_tokenizer(source, padding_side=padding_side)
    try:
        model = auto_class.from_pretrained(source, dtype=_dtype(dev), local_files_only=True)
    except (OSError, ValueError) as e:
        raise SafetyError(f"cannot load {ref!r} as {kind} offline ({e}).") from e
    return model.to(dev), tokenizer


def harmful_label_ids(id2label: Mapping[int, str], names: Sequence[str] = ()) -> list[int]:
    """Indices of the labels that mean harm (the rule is in the module docstring).

    Parameters
    ----------
    id2label : Mapping[int, str]
        The model config's label names.
    names : Sequence[str] (default: ())
        Label names (case-insensitive) or indices to use instead of the rule.
    """
    labels = {int(i): str(n) for i, n in id2label.items()}
    if names:
        by_name = {n.lower(): i for i, n in labels.items()}
        ids = []
        for name in names:
            key = name.strip().lower()
            if key in by_name:
                ids.append(by_name[key])
            elif key.isdigit() and int(key) in labels:
                ids.append(int(key))
            else:
                raise SafetyError(
                    f"label {name!r} is not one of the model's labels "
                    f"({', '.join(labels.values())})."
                )
        return sorted(set(ids))
    harmful = [i for i, n in sorted(labels.items()) if not SAFE_LABEL.match(n.strip())]
    if not harmful or len(harmful) == len(labels):
        raise SafetyError(
            f"cannot tell which labels mean harm ({', '.join(labels.values())}); name them "
            "after the model, e.g. hf:MODEL#LABEL1,LABEL2."
        )
    return harmful


def _batches(n: int, size: int) -> list[slice]:
    if size < 1:
        raise SafetyError(f"batch_size must be at least 1, got {size}.")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class HFClassifierFilter:
    """Any ``AutoModelForSequenceClassification``, by hub id (cached) or local path.

    Parameters
    ----------
    model, tokenizer
        The loaded classifier and its tokenizer.
    harmful_ids : Sequence[int]
        Label indices that mean harm (see `harmful_label_ids`).
    threshold : float (default: 0.5)
        Flag a text when its harm score is at least this.
    name : str (default: "hf")
        What reports call the filter.
    max_length : int (default: 512)
        Token limit per text (longer texts are truncated).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        harmful_ids: Sequence[int],
        threshold: float = 0.5,
        name: str = "hf",
        max_length: int = 512,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.harmful_ids = list(harmful_ids)
        self.threshold = float(threshold)
        self.name = name
        self.max_length = max_length
        self.multi_label = getattr(model.config, "problem_type", None) == (
            "multi_label_classification"
        )
        names = model.config.id2label
        self._categories = (
            tuple(str(names[i]) for i in self.harmful_ids) if len(self.harmful_ids) > 1 else ()
        )

    @classmethod
    def from_pretrained(
        cls, ref: str, *, device: str = "auto", harmful_labels: Sequence[str] = ()
    ) -> HFClassifierFilter:
        """Load `ref` offline onto `device` (bf16 on CUDA) and pick its harmful labels."""
        # heavy: transformers takes ~3 s to import; only loading a model needs it
        from transformers import AutoModelForSequenceClassification

        model, tokenizer = _load_offline(
            ref, AutoModelForSequenceClassification, "a sequence classifier", "right", device
        )
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        ids = harmful_label_ids(model.config.id2label, harmful_labels)
        return cls(model, tokenizer, harmful_ids=ids, name=f"hf:{ref}")

    @property
    def categories(self) -> tuple[str, ...]:
        """The harmful label names, when there is more than one."""
        return self._categories

    def score(self, texts: Sequence[str], *, batch_size: int = 32) -> FilterScores:
        """Harm from the classifier's probabilities, `batch_size` texts per forward pass."""
        # heavy: torch takes ~5 s to import; only scoring needs it
        import torch

        probs = np.zeros((len(texts), len(self.harmful_ids)))
        device = next(self.model.parameters()).device
        for part in _batches(len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[part]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            with torch.inference_mode():
                logits = self.model(**enc).logits.float()
            p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
            probs[part] = p[:, self.harmful_ids].cpu().numpy()
        if not len(texts):
            harm = np.zeros(0)
        elif self.multi_label:
            harm = probs.max(axis=1)
        else:
            harm = np.clip(probs.sum(axis=1), 0.0, 1.0)  # clip: float rounding past 1
        categories = {c: probs[:, j] for j, c in enumerate(self._categories)}
        return FilterScores(harm=harm, categories=categories)


def next_token_logits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
) -> np.ndarray:
    """Logits of the token that would follow each prompt, (n, vocab) float32.

    Prompts are left-padded and given position ids that skip the padding, so a prompt's logits
    do not depend on what else is in its batch.
    """
    # heavy: torch takes ~5 s to import; only scoring needs it
    import torch

    device = next(model.parameters()).device
    out = []
    for part in _batches(len(prompts), batch_size):
        enc = tokenizer(
            list(prompts[part]), padding=True, return_tensors="pt", add_special_tokens=False
        ).to(device)
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(
                input_ids=enc["input_ids"], attention_mask=mask, position_ids=positions
            ).logits
        out.append(logits[:, -1, :].float().cpu().numpy())
    vocab = model.get_output_embeddings().weight.shape[0]
    return np.concatenate(out) if out else np.zeros((0, vocab), dtype=np.float32)


def first_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    """The distinct first token of each word, as the model would start its answer with it."""
    ids = []
    for word in words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if pieces and pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


def log_odds_score(logits: np.ndarray, yes_ids: Sequence[int], no_ids: Sequence[int]) -> np.ndarray:
    """P(yes) / (P(yes) + P(no)) from next-token logits, computed as a sigmoid of the
    log-sum-exp difference so that tiny probabilities do not underflow to 0/0."""
    from scipy.special import expit, logsumexp  # heavy: scipy.special takes ~0.3 s to import

    x = np.asarray(logits, dtype=np.float64)
    return expit(logsumexp(x[:, list(yes_ids)], axis=1) - logsumexp(x[:, list(no_ids)], axis=1))


def guard_prompt(
    text: str, categories: Mapping[str, str] = LLAMA_GUARD_3_CATEGORIES, *, role: str = "User"
) -> str:
    """The Llama Guard task prompt for one message, with `categories` as the policy."""
    policy = "\n".join(f"{code}: {name}." for code, name in categories.items())
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations "
        "according to our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{policy}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{role}: {text}\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated "
        "categories."
    )


def parse_guard_output(output: str) -> tuple[bool | None, tuple[str, ...]]:
    """Parse a guard answer: ``(True, ("S1", "S10"))`` for ``"unsafe\\nS1,S10"``,
    ``(False, ())`` for ``"safe"``, ``(None, ())`` when the first line is neither."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    if not lines:
        return None, ()
    verdict = lines[0].lower().rstrip(".")
    if verdict == "safe":
        return False, ()
    if verdict != "unsafe":
        return None, ()
    codes = re.findall(r"\bS\d+\b", " ".join(lines[1:2]), flags=re.IGNORECASE)
    return True, tuple(dict.fromkeys(c.upper() for c in codes))


def guard_category_scores(
    harm: np.ndarray, answers: Mapping[int, str], codes: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """Per-category scores of a guard: text i scores ``harm[i]`` in each category its category
    line ``answers[i]`` names (codes outside `codes` are ignored), 0 elsewhere."""
    per_code = {code: np.zeros(len(harm)) for code in codes}
    for i, answer in answers.items():
        _, named = parse_guard_output("unsafe\n" + answer)
        for code in named:
            if code in per_code:
                per_code[code][i] = harm[i]
    return {codes[code]: scores for code, scores in per_code.items()}


class GuardFilter:
    """A guard LLM (Llama Guard style) as a filter.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer (left padding is set here).
    categories : Mapping[str, str] (default: `LLAMA_GUARD_3_CATEGORIES`)
        Code to name; the policy in the prompt and the names of the category scores.
    threshold : float (default: 0.5)
        Flag a text when P(unsafe) is at least this.
    name : str (default: "guard")
        What reports call the filter.
    role : str (default: "User")
        Whose message the guard assesses (``"Agent"`` for a model's answer). A native guard
        template (one that writes the policy itself) assesses the text as the user's message.
    max_new_tokens : int (default: 16)
        Budget of the generated category line.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        categories: Mapping[str, str] = LLAMA_GUARD_3_CATEGORIES,
        threshold: float = 0.5,
        name: str = "guard",
        role: str = "User",
        max_new_tokens: int = 16,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.codes = dict(categories)
        self.threshold = float(threshold)
        self.name = name
        self.role = role
        self.max_new_tokens = max_new_tokens
        self.native = bool(_NATIVE_GUARD.search(str(tokenizer.chat_template or "")))
        self.unsafe_ids = first_token_ids(tokenizer, ["unsafe"])
        self.safe_ids = first_token_ids(tokenizer, ["safe"])
        if set(self.unsafe_ids) & set(self.safe_ids):
            raise SafetyError(
                f"guard model {name}: 'safe' and 'unsafe' start with the same token, so its "
                "first answer token cannot score them apart."
            )

    @classmethod
    def from_pretrained(cls, ref: str, *, device: str = "auto") -> GuardFilter:
        """Load a guard causal LM offline onto `device` (bf16 on CUDA)."""
        # heavy: transformers takes ~3 s to import; only loading a model needs it
        from transformers import AutoModelForCausalLM

        model, tokenizer = _load_offline(ref, AutoModelForCausalLM, "a causal LM", "left", device)
        return cls(model, tokenizer, name=f"guard:{ref}")

    @property
    def categories(self) -> tuple[str, ...]:
        """The policy's category names, in code order."""
        return tuple(self.codes.values())

    def prompt(self, text: str) -> str:
        """What the guard reads for `text`, ending where its answer starts."""
        if self.native:  # the template writes the task prompt and policy itself
            messages = [{"role": "user", "content": text}]
        elif self.tokenizer.chat_template:
            messages = [{"role": "user", "content": guard_prompt(text, self.codes, role=self.role)}]
        else:
            return guard_prompt(text, self.codes, role=self.role) + "\n"
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _category_lines(self, prompts: Sequence[str], batch_size: int) -> list[str]:
        # heavy: torch takes ~5 s to import; only scoring needs it
        import torch

        device = next(self.model.parameters()).device
        lines = []
        for part in _batches(len(prompts), batch_size):
            forced = [p + "unsafe\n" for p in prompts[part]]
            enc = self.tokenizer(
                forced, padding=True, return_tensors="pt", add_special_tokens=False
            ).to(device)
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            lines += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return lines

    def score(self, texts: Sequence[str], *, batch_size: int = 8) -> FilterScores:
        """P(unsafe) per text; category scores equal it for the codes the guard names."""
        prompts = [self.prompt(t) for t in texts]
        logits = next_token_logits(self.model, self.tokenizer, prompts, batch_size=batch_size)
        harm = log_odds_score(logits, self.unsafe_ids, self.safe_ids) if len(texts) else np.zeros(0)
        flagged = [i for i in range(len(texts)) if harm[i] >= self.threshold]
        answers = self._category_lines([prompts[i] for i in flagged], batch_size)
        categories = guard_category_scores(
            harm, dict(zip(flagged, answers, strict=True)), self.codes
        )
        return FilterScores(harm=harm, categories=categories)
