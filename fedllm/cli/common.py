"""What several verb groups share: their parser, reading a run directory and the key that
opens it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedllm.config import FedllmConfig, flatten, parse_config
from fedllm.errors import RunDirError
from fedllm.rundir import RunDir
from fedllm.secure.at_rest import AtRestKey, configured_key

__all__ = ["AT_REST_HELP", "at_rest_key", "load_run", "run_config", "verb_group"]

AT_REST_HELP = "the at-rest key file, if not the one the run's security.at-rest-key names"


def load_run(run_dir: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A run directory's path, its config.json and its summary.json."""
    path = Path(run_dir)
    run = RunDir.at(path)
    summary_file, config_file = run.summary_path, run.config_path
    if not config_file.is_file():
        raise RunDirError(f"{path} is not a fedllm run directory (no config.json).")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if not summary_file.is_file():
        raise RunDirError(f"run {path} has no summary.json yet: no round has completed.")
    return path, config, json.loads(summary_file.read_text(encoding="utf-8"))


def at_rest_key(args: argparse.Namespace, run: Path) -> AtRestKey | None:
    """The key that opens a run's sealed checkpoints and ledgers: `--at-rest-key`, else the
    run's own security.at-rest-key (from its config.json); None when the run is not sealed."""
    if args.at_rest_key:
        return configured_key(args.at_rest_key, what="the at-rest key (--at-rest-key)")
    config_file = RunDir.at(run).config_path
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    setting = config.get("config", {}).get("security", {}).get("at_rest_key", "")
    return configured_key(
        setting,
        what=f"the at-rest key that {config_file} names (security.at-rest-key; pass "
        "--at-rest-key PATH if you hold it elsewhere)",
    )


def run_config(config: dict[str, Any]) -> FedllmConfig:
    """The typed config of a run, from its config.json."""
    return parse_config(flatten(config["config"]))


def verb_group(sub: Any, name: str, help_text: str) -> Any:
    """`fedllm NAME ...`: a verb whose subcommands the caller adds (one is required)."""
    return sub.add_parser(name, help=help_text).add_subparsers(
        dest=f"{name}_command", required=True
    )
