"""`fedllm model prepare`: cache a base model for fast loads."""

from __future__ import annotations

import argparse
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.config import ModelConfig

__all__ = ["add_parsers"]


def cmd_model_prepare(args: argparse.Namespace) -> int:
    # heavy: fedllm.model imports torch (~5 s); keeps `fedllm --help` fast
    from fedllm.model import resolve_model_dir

    cfg = ModelConfig(name=args.name, gguf_file=args.gguf_file)
    print(resolve_model_dir(cfg))
    return 0


def add_parsers(sub: Any) -> None:
    """`model prepare`."""
    model = verb_group(sub, "model", "base models")
    prep = model.add_parser("prepare", help="cache a model (GGUF -> safetensors) for fast loads")
    prep.add_argument("--name", default="embedded:smollm2-135m-instruct")
    prep.add_argument("--gguf-file", default="")
    prep.set_defaults(func=cmd_model_prepare)
