"""`fedllm data check PATH`: what a site would train on, before it joins."""

from __future__ import annotations

import argparse
from typing import Any

from fedllm.cli.common import verb_group

__all__ = ["add_parsers"]


def cmd_data_check(args: argparse.Namespace) -> int:
    # heavy: datasets and the tokenizer (transformers) load only here
    from fedllm.config import parse_config
    from fedllm.data.check import check_data
    from fedllm.site import tokenizer_for

    cfg = parse_config({"model.name": args.model, "data.max-length": args.max_length})
    report = check_data(
        args.path,
        tokenizer_for(cfg),
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        category_field=args.category_field or None,
        eval_fraction=args.eval_fraction,
        max_eval_examples=args.max_eval,
        seed=args.seed,
        max_length=args.max_length,
    )
    print("\n".join(report.lines()))
    return 1 if report.problems else 0


def add_parsers(sub: Any) -> None:
    """`data check`."""
    from fedllm.config import parse_config  # light: no torch

    defaults = parse_config({})
    data = verb_group(sub, "data", "a site's own data")
    check = data.add_parser(
        "check", help="show what a site would train on: records, bad lines, split, tokens"
    )
    check.add_argument("path", help="a JSONL, JSON or CSV file, or a save_to_disk folder")
    check.add_argument("--prompt-field", default="prompt")
    check.add_argument("--response-field", default="response")
    check.add_argument("--category-field", default="")
    check.add_argument("--model", default=defaults.model.name, help="whose chat template")
    check.add_argument("--max-length", type=int, default=defaults.data.max_length)
    check.add_argument("--eval-fraction", type=float, default=defaults.data.eval_fraction)
    check.add_argument("--max-eval", type=int, default=defaults.eval.max_examples)
    check.add_argument("--seed", type=int, default=defaults.run.seed)
    check.set_defaults(func=cmd_data_check)
