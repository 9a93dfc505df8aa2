"""Manifest: at every save, the coordinator signs what the run directory holds
(`fedllm.privacy.manifest`): ledger lengths and heads, the last checkpoint, the config."""

from __future__ import annotations

from typing import Any

from fedllm.privacy.manifest import build_manifest, sign_manifest
from fedllm.rundir import RunDir, write_json_atomic
from fedllm.strategy.base import Stage

__all__ = ["Manifest"]


class Manifest(Stage):
    """Writes `manifest.json`, signed with the coordinator's key, under sign-updates. It is
    the last stage, so it signs the files every other stage has just written."""

    name = "manifest"

    @classmethod
    def enabled(cls, cfg: Any) -> bool:
        return bool(cfg.security.sign_updates)

    def write_files(self, run: RunDir) -> None:
        key = self.ctx.coordinator_key
        if key is None:  # the signatures stage loads it; without it there is nothing to sign
            return
        checkpoint = run.latest_checkpoint()
        body = build_manifest(
            run_name=self.cfg.run.name,
            rounds_completed=run.rounds_completed,
            status=str(run.state.get("status", "running")),
            config_sha256=self.ctx.config_sha256,
            config_file=run.config_path,
            run_records=self.ctx.ledger().records(),
            checkpoint=checkpoint,
            registry_sha256=self.ctx.registry_sha256,
        )
        write_json_atomic(run.manifest_path, sign_manifest(body, key))
