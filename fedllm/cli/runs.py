"""`fedllm runs ...`: inspect run directories."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedllm.cli.common import load_run, verb_group
from fedllm.plots import plot_run
from fedllm.rundir import RunDir

__all__ = ["add_parsers"]


def cmd_runs_show(args: argparse.Namespace) -> int:
    # heavy: rich and fedllm.summary (numpy) take ~0.5 s to import; keeps `fedllm --help` fast
    from rich.console import Console

    from fedllm.summary import render_table  # heavy: numpy

    path, _, summary = load_run(args.run)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    console = Console()
    console.print(render_table(summary))
    console.print(f"run directory: {path}")
    console.print(
        f"status: {summary['status']}"
        + (f" ({summary['stop_reason']})" if summary.get("stop_reason") else "")
    )
    losses = ", ".join(f"{x:.4f}" for x in summary["eval_loss"] if x is not None)
    console.print(f"global eval loss by round: {losses}")
    if summary["bytes_per_round"]:
        b = summary["bytes_per_round"][-1]
        console.print(f"bytes last round: up {b['up']:,}, down {b['down']:,}")
    for item in summary.get("rejected_updates", []) + summary.get("failures", []):
        console.print(
            f"[yellow]round {item['round']}: {item.get('sender', item.get('node'))}: "
            f"{item['reason']}[/yellow]"
        )
    if ckpt := summary.get("adapter", {}).get("final_checkpoint"):
        console.print(f"final adapter: {ckpt}")
    return 0


def cmd_runs_plot(args: argparse.Namespace) -> int:
    path, _, summary = load_run(args.run)
    print(plot_run(summary, Path(args.out) if args.out else RunDir.at(path).progress_plot_path))
    return 0


def add_parsers(sub: Any) -> None:
    """`runs show` and `runs plot`."""
    runs = verb_group(sub, "runs", "inspect run directories")
    show = runs.add_parser("show", help="print a run's summary")
    show.add_argument("run", help="outputs/<run-name>")
    show.add_argument("--json", action="store_true", help="print summary.json as is")
    show.set_defaults(func=cmd_runs_show)
    plot = runs.add_parser("plot", help="draw held-out loss and epsilon per site and round")
    plot.add_argument("run", help="outputs/<run-name>")
    plot.add_argument("--out", help="PNG path (default: <run>/progress.png)")
    plot.set_defaults(func=cmd_runs_plot)
