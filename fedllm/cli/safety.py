"""`fedllm safety ...`: measure a content-safety filter on a labelled set.

Each subcommand is one flat `add_parser` block in `add_parsers`, so subcommands owned by
different modules (`eval` here, `train` and `build-sets` by the filters) are added independently.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group

__all__ = ["add_parsers", "default_eval_dir"]


def _slug(text: str) -> str:
    """A file-name-safe rendering of a filter spec or data name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def default_eval_dir(filter_spec: str, data_spec: str) -> Path:
    """``outputs/safety-eval/<filter>-<data>``: the data named by its bundled name or file
    stem, the filter by its spec's kind and last path component."""
    bundled = data_spec.startswith("bundled:")
    data = data_spec.removeprefix("bundled:") if bundled else Path(data_spec).stem
    kind, _, where = filter_spec.partition(":")
    name = f"{kind}-{Path(where.rstrip('/')).name}" if where else kind
    return Path("outputs") / "safety-eval" / f"{_slug(name)}-{_slug(data)}"


def cmd_safety_eval(args: argparse.Namespace) -> int:
    # heavy: the safety modules (numpy) take ~0.5 s to import; keeps `fedllm --help` fast
    from fedllm.safety.evaluation import (
        check_arguments,
        check_data,
        evaluate_filter,
        print_report,
        write_report,
    )
    from fedllm.safety.filters import create_filter
    from fedllm.safety.labelled import load_labelled

    # Arguments and data first: a mistake fails fast, before a model is loaded.
    check_arguments(
        target_fpr=args.target_fpr,
        threshold=args.threshold,
        bootstrap=args.bootstrap,
        batch_size=args.batch_size,
    )
    data = load_labelled(args.data)
    check_data(data)
    safety_filter = create_filter(args.filter, device=args.device)
    result = evaluate_filter(
        safety_filter,
        data,
        target_fpr=args.target_fpr,
        threshold=args.threshold,
        bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    print_report(result)
    json_path, html_path = write_report(
        result, args.out or default_eval_dir(args.filter, args.data)
    )
    print(f"wrote {json_path} and {html_path}")
    return 0


def cmd_safety_train(args: argparse.Namespace) -> int:
    # heavy: the safety modules (numpy) take ~0.5 s to import; keeps `fedllm --help` fast
    from fedllm.safety.embedding import train_embedding_filter
    from fedllm.safety.labelled import load_labelled
    from fedllm.safety.response import train_response_filter

    data = load_labelled(args.data)
    pairs = data.prompts is not None  # a set of answers trains the response filter
    train = train_response_filter if pairs else train_embedding_filter
    trained = train(data, args.out, seed=args.seed, device=args.device)
    info = trained.heads.info
    print(
        f"trained on {info['rows']} rows ({info['harmful']} harmful): C={info['C']:.3g}, "
        f"cross-validated AUROC {info['cv_auroc']:.3f}; categories: "
        f"{', '.join(trained.categories) or 'none'}"
    )
    print(
        f"wrote {args.out}; use it with --filter {'response' if pairs else 'embedding'}:{args.out}"
    )
    return 0


def cmd_safety_build_answers(args: argparse.Namespace) -> int:
    # heavy: generating answers loads the embedded model (torch, transformers)
    from fedllm.safety.answers import write_answers
    from fedllm.safety.labelled import DATA_DIR

    print(f"answers: {write_answers(args.out or DATA_DIR)}")
    return 0


def cmd_safety_build_sets(args: argparse.Namespace) -> int:
    # heavy: the safety modules (numpy) take ~0.5 s to import; keeps `fedllm --help` fast
    from fedllm.safety.bundled import DATA_DIR, check_sets, write_sets

    if args.check:
        stale = check_sets(args.out or DATA_DIR)
        if stale:
            print(f"out of date: {', '.join(stale)}; run `fedllm safety build-sets`.")
            return 1
        print("the bundled sets match a rebuild from the installed package data.")
        return 0
    for name, path in write_sets(args.out or DATA_DIR).items():
        print(f"{name}: {path}")
    return 0


def add_parsers(sub: Any) -> None:
    """`safety eval`, and the filters' `safety train` and `safety build-sets`."""
    safety_sub = verb_group(sub, "safety", "content-safety filters: evaluate, train, build sets")

    ev = safety_sub.add_parser("eval", help="measure a filter on a labelled set (JSON + HTML)")
    ev.add_argument("--filter", required=True, help="lexicon, embedding:DIR, hf:ID, guard:ID, ...")
    ev.add_argument("--data", required=True, help="a CSV/JSONL file or bundled:NAME")
    ev.add_argument("--out", help="report directory (default: outputs/safety-eval/<filter>-<data>)")
    ev.add_argument(
        "--target-fpr", type=float, default=0.05, help="FPR the reported threshold meets"
    )
    ev.add_argument("--threshold", type=float, help="flag at this score (default: the filter's)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% CIs")
    ev.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ev.set_defaults(func=cmd_safety_eval)

    tr = safety_sub.add_parser(
        "train",
        help="train and save an embedding head: on texts the prompt filter, on answers "
        "(prompt,response,label) the response filter",
    )
    tr.add_argument("--data", required=True, help="a CSV/JSONL file or bundled:NAME")
    tr.add_argument("--out", required=True, help="directory for head.json + head.safetensors")
    tr.add_argument("--seed", type=int, default=0, help="seed of the cross-validation folds")
    tr.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    tr.set_defaults(func=cmd_safety_train)

    bs = safety_sub.add_parser("build-sets", help="rebuild the bundled sets from package data")
    bs.add_argument("--check", action="store_true", help="only verify the committed files")
    bs.add_argument("--out", help="directory (default: the package's fedllm/safety/data)")
    bs.set_defaults(func=cmd_safety_build_sets)

    ba = safety_sub.add_parser(
        "build-answers",
        help="make the labelled answer set the response filter trains on (runs the embedded model)",
    )
    ba.add_argument("--out", help="directory (default: the package's fedllm/safety/data)")
    ba.set_defaults(func=cmd_safety_build_answers)
