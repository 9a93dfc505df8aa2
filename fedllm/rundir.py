"""One run = one directory: resolved config, per-round checkpoints, state and summary.

Every file is written atomically (temporary file, fsync, rename), so a crash at any point
leaves the directory as it was after the last completed round, and a rerun with the same
name resumes from there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.config import FedllmConfig, SafetyConfig, config_hash
from fedllm.errors import RunDirError

__all__ = ["LEDGER_FILE", "RunDir", "write_json_atomic"]

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
LEDGER_FILE = "ledger.jsonl"


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_KEY_LOCATIONS = ("registry", "site_signing_key", "at_rest_key")


def _resume_key(cfg: FedllmConfig) -> str:
    """What must match to resume: everything except how many rounds to run in total and
    where key files live (moving a key must not orphan a run; a different at-rest key is
    caught by its key id when the checkpoint or ledger is opened)."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("rounds", "timeout")}
    d["security"] = {k: v for k, v in d["security"].items() if k not in _KEY_LOCATIONS}
    if d["safety"] == dataclasses.asdict(SafetyConfig()):
        del d["safety"]  # runs made before safety screening existed still resume
    return json.dumps(d, sort_keys=True)


@dataclass
class RunDir:
    """A run directory; `state` holds the history a resumed run continues."""

    path: Path
    state: dict[str, Any]

    @staticmethod
    def path_for(cfg: FedllmConfig) -> Path:
        """`output_dir/name`; an empty name becomes a new timestamped one."""
        if not cfg.run.name:
            cfg.run.name = time.strftime("run-%Y%m%d-%H%M%S")
        return Path(cfg.run.output_dir).expanduser().resolve() / cfg.run.name

    @classmethod
    def find(cls, cfg: FedllmConfig) -> RunDir | None:
        """The existing run to resume, or None; a different config under the name is refused."""
        path = cls.path_for(cfg)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            return None
        saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if saved.get("resume_key") != _resume_key(cfg):
            raise RunDirError(
                f"run directory {path} was made with a different configuration; "
                "choose another 'run.name' to start a new run."
            )
        return cls(path=path, state=json.loads(state_file.read_text(encoding="utf-8")))

    @classmethod
    def create(cls, cfg: FedllmConfig, state: dict[str, Any]) -> RunDir:
        """Write a new run directory: config first, then the state it starts from."""
        path = cls.path_for(cfg)
        path.mkdir(parents=True, exist_ok=True)
        (path / CHECKPOINTS).mkdir(exist_ok=True)
        write_json_atomic(
            path / CONFIG_FILE,
            {
                "config": cfg.to_dict(),
                "config_hash": config_hash(cfg),
                "resume_key": _resume_key(cfg),
            },
        )
        run = cls(path=path, state=state)
        run.save_state()
        return run

    @property
    def rounds_completed(self) -> int:
        return int(self.state["rounds_completed"])

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{server_round}"

    def latest_checkpoint(self) -> Path | None:
        r = self.rounds_completed
        return self.checkpoint_dir(r) if r > 0 else None

    def save_state(self) -> None:
        write_json_atomic(self.path / STATE_FILE, self.state)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        write_json_atomic(self.path / SUMMARY_FILE, summary)
        return self.path / SUMMARY_FILE
