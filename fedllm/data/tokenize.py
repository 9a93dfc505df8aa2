"""One site's examples as training ids: the train/held-out split, the model's chat template
with the loss on the answer only (prompt and padding are labelled ``-100``), and batching."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import datasets
import torch

from fedllm.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "collate_batch", "split_train_eval", "tokenize_examples"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that PyTorch's cross-entropy (and ``transformers``' causal-LM loss) skips."""

_CHAT_BATCH = 256

_SPLIT_DOMAIN = "fedllm.split-train-eval.v1"
"""Prefix of every split hash, so it is never the same hash as one made for another use."""


def split_train_eval(
    ds: datasets.Dataset,
    *,
    eval_fraction: float,
    max_eval_examples: int,
    seed: int,
    scheme: str = "hash",
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a bounded, reproducible evaluation set, deciding each record by its own hash.

    Each record gets ``u = H(seed, record) / 2**64`` in [0, 1): the first 8 bytes
    (big-endian) of the SHA-256 of the compact JSON list ``["fedllm.split-train-eval.v1",
    seed, prompt, response, category]`` (``category`` is ``null`` where the column is
    absent). A record is held out iff ``u < eval_fraction``. Its side therefore depends on
    its own content and the seed only, never on which other records the site holds (apart
    from the cap and the two fallbacks below): adding or removing one record moves no other
    record between train and held-out, so DP's epsilon, computed over the training split,
    describes one record of the site's own data. Content-identical duplicates have the same
    hash and land on the same side; that is correct, an exact duplicate is the same record.

    The cap keeps the held-out records of smallest hash: it cuts at the largest hash value
    with at most ``max_eval_examples`` held-out records at or below it, so it never separates
    duplicates either. A record's rank by its own hash does not depend on the others, so when
    the cap binds, adding one record moves at most one held-out record (the one of largest
    hash, with its exact duplicates) back to train, and removing one record moves at most
    one train record (the one of smallest hash above the cut, with its duplicates) into
    held-out; no other record moves from train to held-out on an addition, or the other way
    on a removal. When the cap does not bind, no other record moves at all.

    Two fallbacks are the only cases where the set's size decides a record's side (and
    where duplicates may be separated; ties between equal hashes go by position): if the
    rule holds out no record, the record of smallest hash is held out (so ``eval`` is never
    empty unless ``max_eval_examples`` is 0); if it holds out every record, the one of
    largest hash is kept for training (so ``train`` is never empty). For ``n`` distinct
    records these happen with probability ``(1 - eval_fraction)**n`` and
    ``eval_fraction**n``: on small sites only (the first also when the cap is smaller than
    the group of duplicates of smallest hash).

    Parameters
    ----------
    ds : datasets.Dataset
        One site's examples, with ``prompt`` and ``response`` (and optionally ``category``)
        columns.
    eval_fraction : float
        Probability, per record, of being held out, in (0, 1).
    max_eval_examples : int
        Cap on the held-out set: evaluating every held-out example each round is what made
        rounds slow on CPU, so the cost stays bounded however large the site is.
    seed : int
        The run seed, hashed with each record; the same seed always gives the same split and
        a different seed an independent one.
    scheme : str
        ``"hash"`` (the above), or ``"permutation"``: the seeded shuffle of the whole set
        that runs made before ``data.split`` existed used, where the first
        ``min(max(1, round(n * eval_fraction)), max_eval_examples, n - 1)`` are held out
        (kept so those runs resume on the records they trained on).

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        ``(train, eval)``: disjoint, together all of ``ds``, each in the original order;
        ``eval`` has about ``n * eval_fraction`` rows (binomially distributed) and at most
        ``max_eval_examples``, and ``train`` at least one.

    Raises
    ------
    ConfigError
        If ``eval_fraction`` is outside (0, 1) or ``max_eval_examples`` is negative.
    DataError
        If the site has fewer than two examples.
    """
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"data.eval-fraction = {eval_fraction} must be in (0, 1).")
    if max_eval_examples < 0:
        raise ConfigError(f"The eval example cap must be >= 0, got {max_eval_examples}.")
    n = len(ds)
    if n < 2:
        raise DataError(
            f"A site with {n} example(s) cannot be split into training and evaluation sets; "
            "give each site at least two examples (fewer sites or more data)."
        )
    if scheme == "permutation":
        n_eval = min(max(1, round(n * eval_fraction)), max_eval_examples, n - 1)
        shuffled = ds.shuffle(seed=seed)
        return shuffled.select(range(n_eval, n)), shuffled.select(range(n_eval))
    hashes = _record_hashes(ds, seed)
    bound = eval_fraction * 2**64  # exact: int < float compares exactly in Python
    held = sorted((h, i) for i, h in enumerate(hashes) if h < bound)
    if len(held) > max_eval_examples:
        cut = max_eval_examples
        while cut > 0 and held[cut - 1][0] == held[cut][0]:  # keep duplicates together
            cut -= 1
        held = held[:cut]
    if not held and max_eval_examples > 0:
        held = [min((h, i) for i, h in enumerate(hashes))]
    elif len(held) == n:
        held = held[:-1]
    eval_idx = sorted(i for _, i in held)
    held_set = set(eval_idx)
    train_idx = [i for i in range(n) if i not in held_set]
    return ds.select(train_idx), ds.select(eval_idx)


def _record_hashes(ds: datasets.Dataset, seed: int) -> list[int]:
    """``H(seed, record)`` of each row as an integer in [0, 2**64) (see `split_train_eval`)."""
    prompts, responses = ds["prompt"], ds["response"]
    categories = ds["category"] if "category" in ds.column_names else [None] * len(ds)
    hashes = []
    for prompt, response, category in zip(prompts, responses, categories, strict=True):
        payload = json.dumps(
            [_SPLIT_DOMAIN, seed, prompt, response, category], separators=(",", ":")
        )
        digest = hashlib.sha256(payload.encode("utf-8")).digest()
        hashes.append(int.from_bytes(digest[:8], "big"))
    return hashes


def tokenize_examples(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> list[dict[str, list[int]]]:
    r"""Render each example with the model's chat template and label only the answer.

    Parameters
    ----------
    ds : datasets.Dataset
        Examples with ``prompt`` and ``response`` columns.
    tokenizer : transformers.PreTrainedTokenizerBase
        The base model's tokenizer. Its chat template is used so fine-tuning sees exactly the
        format the instruct model is prompted with; without one, a plain
        ``"User: ...\nAssistant: ..."`` format plus EOS is used (with a warning).
    max_length : int
        Longest sequence kept. Longer examples are cut at the end (keeping at least one answer
        token); examples whose prompt alone fills ``max_length`` are dropped, since they would
        carry no answer to learn.

    Returns
    -------
    list[dict[str, list[int]]]
        One ``{"input_ids", "labels"}`` pair of equal-length int lists per kept example, with
        ``labels`` equal to ``input_ids`` on the answer and ``-100`` on the prompt.
    """
    if max_length < 2:
        raise ConfigError(f"data.max-length = {max_length} must be at least 2.")
    prompts, responses = ds["prompt"], ds["response"]
    if getattr(tokenizer, "chat_template", None):
        prompt_ids, full_ids = _chat_template_ids(tokenizer, prompts, responses)
    else:
        log.warning(
            "Tokenizer has no chat template: using a plain 'User: ...\\nAssistant: ...' format; "
            "prefer an instruct model's tokenizer"
        )
        prompt_ids, full_ids = _plain_format_ids(tokenizer, prompts, responses)

    features: list[dict[str, list[int]]] = []
    too_long = misaligned = 0
    for prompt, full in zip(prompt_ids, full_ids, strict=True):
        boundary = len(prompt)
        if full[:boundary] != prompt:
            # Some tokenizers merge the last prompt token with the first answer token: mask the
            # shared prefix only, so no prompt token is ever a label.
            boundary = _common_prefix(prompt, full)
            misaligned += 1
        if boundary >= max_length or boundary >= len(full):
            too_long += 1
            continue
        input_ids = list(full[:max_length])
        labels = [IGNORE_INDEX] * boundary + input_ids[boundary:]
        features.append({"input_ids": input_ids, "labels": labels})
    if misaligned:
        log.warning(
            "%d examples: prompt ids were not a prefix of the full chat ids; masked the common "
            "prefix",
            misaligned,
        )
    if too_long:
        log.warning(
            "Dropped %d of %d examples whose prompt fills max_length=%d or that have no answer "
            "tokens",
            too_long,
            len(prompt_ids),
            max_length,
        )
    log.info("Tokenized %d examples (max_length=%d)", len(features), max_length)
    return features


def _chat_template_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids: list[list[int]] = []
    full_ids: list[list[int]] = []
    for start in range(0, len(prompts), _CHAT_BATCH):
        batch_p = prompts[start : start + _CHAT_BATCH]
        batch_r = responses[start : start + _CHAT_BATCH]
        user_turns = [[{"role": "user", "content": p}] for p in batch_p]
        exchanges = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(batch_p, batch_r, strict=True)
        ]
        prompt_ids += _ids_batch(
            tokenizer.apply_chat_template(user_turns, add_generation_prompt=True, tokenize=True)
        )
        full_ids += _ids_batch(tokenizer.apply_chat_template(exchanges, tokenize=True))
    return prompt_ids, full_ids


def _ids_batch(output: Any) -> list[list[int]]:
    """Normalise ``apply_chat_template(..., tokenize=True)`` output to a list of id lists.

    transformers 5 returns a ``BatchEncoding`` (``return_dict=True`` is the default there);
    4.x returned the ids themselves. Tensors appear if a caller's tokenizer forces them.
    """
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        output = output["input_ids"]
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    if output and isinstance(output[0], int):
        output = [output]
    return [[int(i) for i in ids] for ids in output]


def _plain_format_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    eos = tokenizer.eos_token or ""
    # The space before the answer belongs to the answer's first word: BPE and SentencePiece
    # vocabularies attach it there, so the prompt's ids stay a prefix of the full ids.
    prompt_texts = [f"User: {p}\nAssistant:" for p in prompts]
    full_texts = [f"{pt} {r}{eos}" for pt, r in zip(prompt_texts, responses, strict=True)]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(full_texts, add_special_tokens=True)["input_ids"]
    return [list(ids) for ids in prompt_ids], [list(ids) for ids in full_ids]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def collate_batch(
    features: Sequence[Mapping[str, Sequence[int]]], *, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its own longest sequence.

    Padding to the batch's longest example rather than a fixed ``max_length`` matters on CPU:
    chat-formatted chatterbot pairs average ~43 tokens, so a fixed 128 would triple the cost.

    Parameters
    ----------
    features : Sequence[Mapping[str, Sequence[int]]]
        Items from :func:`tokenize_examples` (``labels`` defaults to ``input_ids`` if absent).
    pad_token_id : int
        Id written into padded ``input_ids`` positions (masked out by ``attention_mask``).

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids``, ``attention_mask`` (1 on tokens, 0 on padding) and ``labels`` (``-100``
        on padding), each a ``long`` tensor of shape ``(len(features), longest)``.
    """
    if not features:
        raise ValueError("collate_batch needs at least one example.")
    longest = max(len(f["input_ids"]) for f in features)
    shape = (len(features), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        ids = feature["input_ids"]
        row_labels = feature.get("labels", ids)
        if len(row_labels) != len(ids):
            raise ValueError(
                f"Example {row} has {len(ids)} input ids but {len(row_labels)} labels."
            )
        n = len(ids)
        input_ids[row, :n] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
