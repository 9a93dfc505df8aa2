"""`fedllm config keys`: every run-config key, its type, default and help."""

from __future__ import annotations

import argparse
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.config import known_keys

__all__ = ["add_parsers"]


def cmd_config_keys(_: argparse.Namespace) -> int:
    for key, (typ, f) in known_keys().items():
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(choices)}]" if choices else ""
        print(f"{key} ({typ.__name__}, default {f.default!r}){extra}: {f.metadata['help']}")
    return 0


def add_parsers(sub: Any) -> None:
    """`config keys`."""
    config = verb_group(sub, "config", "configuration")
    config.add_parser("keys", help="list every run-config key").set_defaults(func=cmd_config_keys)
