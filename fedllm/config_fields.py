"""What every config section is built from: a field's help text and choices, and the range
check whose one-sentence error quotes the key and the value.

Its own module so that `fedllm.config` and the sections that live beside their feature
(`fedllm.privacy.config`, ...) share it without importing each other.
"""

from __future__ import annotations

from typing import Any

from fedllm.errors import ConfigError

__all__ = ["field_help", "require"]


def field_help(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A field's metadata: its help text (`fedllm config keys`) and its allowed values."""
    return {"help": text, "choices": choices}


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise `ConfigError` naming `key` and `value` unless `ok`."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {why}.")
