"""One run = one directory: resolved config, per-round checkpoints, state and summary.

Every file is written atomically (temporary file, fsync, rename; a checkpoint is a
temporary directory renamed into place: `fedllm.disk`), and the last completed round is the
one `state.json` names, so a crash or a failed write at any point leaves the directory as it
was after that round, and a rerun with the same name resumes from there. A failed write is
a `DiskError` naming the file; `left_on_disk` says what the stopped run kept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.config import FedllmConfig, config_hash, stable_dict
from fedllm.disk import atomic_file, writing
from fedllm.errors import RunDirError

__all__ = ["EMPIRICAL_AUDIT", "LEDGER_FILE", "RunDir", "write_json_atomic"]

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
LEDGER_FILE = "ledger.jsonl"
MANIFEST_FILE = "manifest.json"
SAFETY_DIR = "safety"
AUDIT_DIR = "audit"
SITES_DIR = "sites"
PROGRESS_PLOT = "progress.png"
AUDIT_REPORT = "audit-report"  # .md and .html
EMPIRICAL_AUDIT = Path(AUDIT_DIR) / "empirical.json"  # `fedllm audit canaries`
CANARY_CLIENTS_AUDIT = Path(AUDIT_DIR) / "canary-clients.json"  # the coordinator's


def write_json_atomic(path: Path, payload: Any) -> None:
    """`payload` as JSON at `path`, all or nothing; a failed write is a `DiskError`."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_KEY_LOCATIONS = ("registry", "site_signing_key", "at_rest_key")


def _resume_key(cfg: FedllmConfig) -> str:
    """What must match to resume: everything except how many rounds to run in total, the
    round deadline, whether replies are folded as they arrive, and where key files live
    (moving a key must not orphan a run; a different at-rest key is caught by its key id
    when the checkpoint or ledger is opened)."""
    d = stable_dict(cfg, late_sections=("safety", "validate"))
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("rounds", "timeout")}
    d["strategy"].pop("streaming", None)  # how replies are received, not what is computed
    d["security"] = {k: v for k, v in d["security"].items() if k not in _KEY_LOCATIONS}
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
            made_before = "split" not in saved.get("config", {}).get("data", {"split": ""})
            if made_before and cfg.data.split != "permutation":
                raise RunDirError(
                    f"run directory {path} was made before data.split existed, when every "
                    "site split its records by a seeded permutation; resume it with "
                    "data.split = \"permutation\" (or choose another 'run.name')."
                )
            raise RunDirError(
                f"run directory {path} was made with a different configuration; "
                "choose another 'run.name' to start a new run."
            )
        return cls(path=path, state=json.loads(state_file.read_text(encoding="utf-8")))

    @classmethod
    def create(cls, cfg: FedllmConfig, state: dict[str, Any]) -> RunDir:
        """Write a new run directory: config first, then the state it starts from."""
        path = cls.path_for(cfg)
        with writing(path / CHECKPOINTS):
            (path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
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

    @classmethod
    def left_on_disk(cls, cfg: FedllmConfig) -> str:
        """What a stopped run kept, as its `state.json` on disk says (not the round the run
        was in, whose files may be partly written): for the one line that ends the run."""
        state_file = cls.path_for(cfg) / STATE_FILE
        done = 0
        if state_file.is_file():
            done = int(json.loads(state_file.read_text(encoding="utf-8"))["rounds_completed"])
        again = f"rerun with the same run.name ({cfg.run.name!r})"
        if done:
            return f"round {done} (the last completed) is intact; {again} to resume"
        return f"no round has completed; {again} to start it"

    @property
    def rounds_completed(self) -> int:
        return int(self.state["rounds_completed"])

    @property
    def ledger_path(self) -> Path:
        """The run's privacy ledger."""
        return self.path / LEDGER_FILE

    @staticmethod
    def safety_records_name(server_round: int) -> str:
        """Where a screening round's per-probe records live, relative to the run dir (the
        summary names the file this way)."""
        return f"{SAFETY_DIR}/round-{server_round}.json"

    def safety_records_path(self, server_round: int) -> Path:
        return self.path / self.safety_records_name(server_round)

    @property
    def canary_clients_audit_path(self) -> Path:
        return self.path / CANARY_CLIENTS_AUDIT

    @property
    def empirical_audit_path(self) -> Path:
        return self.path / EMPIRICAL_AUDIT

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def progress_plot_path(self) -> Path:
        return self.path / PROGRESS_PLOT

    def audit_report_paths(self) -> tuple[Path, Path]:
        """The audit report as Markdown and as HTML."""
        return self.path / f"{AUDIT_REPORT}.md", self.path / f"{AUDIT_REPORT}.html"

    @staticmethod
    def site_ledger_path(root: Path, site: int) -> Path:
        """A site's own privacy ledger under `root` (its state dir, or the run directory in
        a simulation)."""
        return Path(root) / SITES_DIR / f"site-{site}" / LEDGER_FILE

    def ledger_paths(self) -> list[Path]:
        """The run's ledger, then every site ledger kept in the run directory."""
        return [self.ledger_path, *sorted(self.path.glob(f"{SITES_DIR}/*/{LEDGER_FILE}"))]

    def checkpoint(self, name: str) -> Path:
        """A checkpoint by its directory name (`round-N`)."""
        return self.path / CHECKPOINTS / name

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{server_round}"

    def latest_checkpoint(self) -> Path | None:
        """The last round's checkpoint that state.json records: the last completed round's,
        or that of a round trained (and checkpointed) but not yet evaluated."""
        r = max(self.rounds_completed, int(self.state.get("trained_round", 0)))
        return self.checkpoint_dir(r) if r > 0 else None

    def save_state(self) -> None:
        write_json_atomic(self.path / STATE_FILE, self.state)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        write_json_atomic(self.summary_path, summary)
        return self.summary_path

    @classmethod
    def at(cls, path: Path) -> RunDir:
        """An existing run directory, read for reporting (its state as saved, if any)."""
        state_file = Path(path) / STATE_FILE
        state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
        return cls(path=Path(path), state=state)
