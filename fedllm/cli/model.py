"""`fedllm model prepare`: cache a base model for fast loads; `fedllm model fingerprint`:
the value a run's `model.fingerprint` must hold for that model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.config import ModelConfig
from fedllm.errors import ModelError
from fedllm.model_fingerprint import model_fingerprint, run_model_fingerprint  # no torch

__all__ = ["add_parsers"]


def cmd_model_prepare(args: argparse.Namespace) -> int:
    # heavy: fedllm.model imports torch (~5 s); keeps `fedllm --help` fast
    from fedllm.model import resolve_model_dir

    cfg = ModelConfig(name=args.name, gguf_file=args.gguf_file)
    print(resolve_model_dir(cfg))
    return 0


def cmd_model_fingerprint(args: argparse.Namespace) -> int:
    """Print the SHA-256 of a model directory, or of the model a run's `model.name` names."""
    if Path(args.model).expanduser().is_dir() and not args.gguf_file:
        print(model_fingerprint(args.model))
        return 0
    fingerprint = run_model_fingerprint(ModelConfig(name=args.model, gguf_file=args.gguf_file))
    if fingerprint is None:
        raise ModelError(
            f"model {args.model!r} is not in the local Hugging Face cache; download it first "
            "(nothing is downloaded to fingerprint it)."
        )
    print(fingerprint)
    return 0


def add_parsers(sub: Any) -> None:
    """`model prepare`, `model fingerprint`."""
    model = verb_group(sub, "model", "base models")
    prep = model.add_parser("prepare", help="cache a model (GGUF -> safetensors) for fast loads")
    prep.add_argument("--name", default="embedded:smollm2-135m-instruct")
    prep.add_argument("--gguf-file", default="")
    prep.set_defaults(func=cmd_model_prepare)
    fp = model.add_parser(
        "fingerprint",
        help="print the SHA-256 of a base model (config, weights, tokenizer): model.fingerprint",
    )
    fp.add_argument(
        "model",
        metavar="PATH_OR_NAME",
        help="a model directory, embedded:smollm2-135m-instruct, or a cached hub id",
    )
    fp.add_argument("--gguf-file", default="", help="GGUF file inside PATH (as model.gguf-file)")
    fp.set_defaults(func=cmd_model_fingerprint)
