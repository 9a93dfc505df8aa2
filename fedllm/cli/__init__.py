"""`fedllm ...`: prepare models, inspect runs, generate with a trained adapter.

Every `FedllmError` becomes one line on stderr and exit code 2, never a traceback.

One module per verb group, each adding its parsers with `add_parsers(sub)`, in the order
`fedllm --help` lists them: `runs`, `generate`, `keys`, `he`, `model`, `data`, `site`,
`audit`, `config`, `federation` (the one CLI module that imports Flower), `deploy` (`pki`,
`superlink`, `supernode`), `safety` and `bench` (the benchmark suite of a checkout). A
handler imports what is heavy (numpy, torch, Flower) itself, so building the parser, and
`fedllm --help`, stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fedllm.cli import (
    audit,
    bench,
    config,
    data,
    deploy,
    federation,
    generate,
    he,
    keys,
    model,
    runs,
    safety,
    site,
)
from fedllm.errors import FedllmError

__all__ = ["build_parser", "main"]

_VERB_GROUPS = (
    runs,
    generate,
    keys,
    he,
    model,
    data,
    site,
    audit,
    config,
    federation,
    deploy,
    safety,
    bench,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _VERB_GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FedllmError as e:
        print(f"fedllm: error: {e}", file=sys.stderr)
        return 2
