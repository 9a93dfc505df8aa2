"""The registry of safety filters: `create_filter("NAME[:ARG]")` builds one by name.

Built-in names (the argument after the first colon):

- ``lexicon`` / ``lexicon:PATH``: weighted regexes (`fedllm.safety.lexicon`), the bundled
  lexicon or a custom JSON file;
- ``embedding`` / ``embedding:DIR``: the sentence-embedding classifier
  (`fedllm.safety.embedding`), the bundled head or one saved by ``fedllm safety train``;
- ``response`` / ``response:DIR``: the response filter (`fedllm.safety.response`), which
  judges an answer with its prompt (the bundled head, or one saved by ``fedllm safety train``
  on a set of answers); single texts go to the bundled embedding head;
- ``hf:ID_OR_PATH[#LABEL,...]``: a Hugging Face sequence classifier; after ``#``, the labels
  that mean harm when the default rule (`fedllm.safety.hf_classifier`) does not fit;
- ``guard:ID_OR_PATH``: a Llama Guard style guard LLM;
- ``judge:MODEL``: a local chat model asked whether the text is harmful
  (``judge:embedded:smollm2-135m-instruct``, a local directory, or a cached hub id).

Models load strictly offline. The filter modules import torch and their model libraries only
when a model-backed filter is built, so listing or creating the lexicon never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable

from fedllm.safety.base import SafetyError, SafetyFilter
from fedllm.safety.embedding import EmbeddingFilter
from fedllm.safety.hf_classifier import GuardFilter, HFClassifierFilter
from fedllm.safety.judge import JudgeFilter
from fedllm.safety.lexicon import LexiconFilter
from fedllm.safety.response import ResponseFilter

__all__ = ["FilterFactory", "create_filter", "known_filters", "register_filter"]

FilterFactory = Callable[[str | None, str], SafetyFilter]
"""Builds a filter from the spec's argument (None when absent) and a device name."""

_FILTERS: dict[str, FilterFactory] = {}


def register_filter(name: str, factory: FilterFactory, *, force: bool = False) -> None:
    """Make `create_filter(name[:arg])` call `factory(arg, device)`.

    Raises `ValueError` if `name` is taken (pass ``force=True`` to replace it) or contains a
    colon, which separates the name from its argument.
    """
    if not name or ":" in name:
        raise ValueError(f"A filter name must be non-empty and contain no colon, got {name!r}.")
    if name in _FILTERS and not force:
        raise ValueError(f"Filter {name!r} is already registered; pass force=True to replace it.")
    _FILTERS[name] = factory


def known_filters() -> tuple[str, ...]:
    """Registered filter names, sorted."""
    return tuple(sorted(_FILTERS))


def create_filter(spec: str, *, device: str = "auto") -> SafetyFilter:
    """Build the filter `spec` names (``NAME`` or ``NAME:ARG``) on `device`.

    Parameters
    ----------
    spec : str
        A registered name, optionally followed by ``:`` and its argument.
    device : str (default: "auto")
        ``auto`` (CUDA when present), ``cpu`` or ``cuda``, for filters that run a model.

    Returns
    -------
    SafetyFilter
        The filter, ready to score.

    Raises
    ------
    SafetyError
        The name is unknown (the message lists the known ones), its argument is missing or
        wrong, or its model cannot be loaded offline.
    """
    name, sep, arg = spec.strip().partition(":")
    if name not in _FILTERS:
        raise SafetyError(
            f"unknown safety filter {name!r}; known filters: {', '.join(known_filters())}."
        )
    if sep and not arg:
        raise SafetyError(f"safety filter spec {spec!r} has an empty argument after ':'.")
    return _FILTERS[name](arg or None, device)


def _required(name: str, arg: str | None, what: str) -> str:
    if not arg:
        raise SafetyError(f"safety filter {name!r} needs {what}, e.g. {name}:{what.upper()}.")
    return arg


def _lexicon(arg: str | None, device: str) -> SafetyFilter:
    return LexiconFilter.load(arg, name=f"lexicon:{arg}" if arg else "lexicon")


def _embedding(arg: str | None, device: str) -> SafetyFilter:
    return EmbeddingFilter.load(arg, device=device, name=f"embedding:{arg}" if arg else "embedding")


def _response(arg: str | None, device: str) -> SafetyFilter:
    return ResponseFilter.load(arg, device=device, name=f"response:{arg}" if arg else "response")


def _hf(arg: str | None, device: str) -> SafetyFilter:
    ref, _, labels = _required("hf", arg, "model").partition("#")
    names = [n for n in labels.split(",") if n.strip()]
    return HFClassifierFilter.from_pretrained(ref, device=device, harmful_labels=names)


def _guard(arg: str | None, device: str) -> SafetyFilter:
    return GuardFilter.from_pretrained(_required("guard", arg, "model"), device=device)


def _judge(arg: str | None, device: str) -> SafetyFilter:
    return JudgeFilter.from_model_name(_required("judge", arg, "model"), device=device)


for _name, _factory in (
    ("embedding", _embedding),
    ("guard", _guard),
    ("hf", _hf),
    ("judge", _judge),
    ("lexicon", _lexicon),
    ("response", _response),
):
    register_filter(_name, _factory)
