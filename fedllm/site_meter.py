"""How many evaluation requests a site has answered, per round, per run and in all: counted
at the site, under its `state-dir`, before each answer is computed, so its policy's caps
(`max-evaluations-per-round`, `max-evaluations-per-run`, `max-evaluations`) hold across
processes and restarts.

Flower starts a process per message, so the count lives in a file
(`<state-dir>/evaluations.json`), changed under an exclusive lock (`fcntl.flock`: two
ClientApps of one SuperNode may run at once) and replaced atomically (temporary file, fsync,
rename). An answer is counted before it exists: a crash in between over-counts, never
under-counts. A corrupt count file stops the site; it is never reset.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Any

from fedllm.errors import ConfigError
from fedllm.rundir import write_json_atomic
from fedllm.site_policy import SitePolicy

__all__ = ["METER_FILE", "charge_evaluation", "evaluation_counts"]

METER_FILE = "evaluations.json"


def evaluation_counts(state_dir: str | Path) -> dict[str, Any]:
    """The counts so far: `{"total": n, "runs": {run: {"total": n, "rounds": {r: n}}}}`."""
    path = Path(state_dir) / METER_FILE
    if not path.exists():
        return {"total": 0, "runs": {}}
    try:
        counts = json.loads(path.read_text(encoding="utf-8"))
        int(counts["total"]), dict(counts["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} is not fedllm's evaluation count ({e}); the site stops rather than "
            "start counting again: restore the file from a backup."
        ) from e
    return counts


def _over(policy: SitePolicy, counts: dict[str, Any], run: str, server_round: int) -> str:
    this_run = counts["runs"].get(run, {"total": 0, "rounds": {}})
    in_round = int(this_run["rounds"].get(str(server_round), 0))
    where = f"site policy {policy.source}" if policy.source else "site policy"
    for key, cap, done, what in (
        ("max-evaluations-per-round", policy.max_evaluations_per_round, in_round,
         f"in round {server_round} of run {run!r}"),
        ("max-evaluations-per-run", policy.max_evaluations_per_run, int(this_run["total"]),
         f"in run {run!r}"),
        ("max-evaluations", policy.max_evaluations, int(counts["total"]), "over every run"),
    ):  # fmt: skip
        if cap and done >= cap:
            return f"{where}: {key} = {cap}, and it has answered {done} {what}"
    return ""


def charge_evaluation(
    state_dir: str | Path | None, policy: SitePolicy, *, run: str, server_round: int
) -> str:
    """Count one evaluation answer for `run` and `server_round`, durably, and return "";
    or, when the policy's caps are reached, count nothing and return why it refuses.
    Without caps nothing is counted.

    Raises
    ------
    ConfigError
        If the policy caps evaluations but the node config names no `state-dir` to count
        them in, or the count file is corrupt.
    """
    if not policy.meters_evaluation:
        return ""
    if not state_dir:
        raise ConfigError(
            f"site policy {policy.source or ''}: max-evaluations* caps need somewhere to "
            "count: set the node config's 'state-dir'."
        )
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{METER_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        counts = evaluation_counts(root)
        reason = _over(policy, counts, run, server_round)
        if reason:
            return reason
        this_run = counts["runs"].setdefault(run, {"total": 0, "rounds": {}})
        rounds = this_run["rounds"]
        rounds[str(server_round)] = int(rounds.get(str(server_round), 0)) + 1
        this_run["total"] = int(this_run["total"]) + 1
        counts["total"] = int(counts["total"]) + 1
        write_json_atomic(root / METER_FILE, counts)
    return ""
