"""fedllm ServerApp: parse the run config, check the disk (`fedllm.disk`), build the run,
run it. Every per-round mechanism (signatures, spends, validation, user-level and
distributed DP, the HE sum, the safety gate) is a stage around the configured Flower
strategy; the loop (`fedllm.strategy.loop.FederatedRun`) resumes, evaluates round 0, runs
the rounds, checkpoints and stops."""

from __future__ import annotations

from logging import ERROR
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedllm.config import parse_config
from fedllm.disk import check_output_folder, needed_bytes
from fedllm.errors import DiskError, FedllmError
from fedllm.model import adapter_spec
from fedllm.rundir import RunDir
from fedllm.secure.instruction import config_digest
from fedllm.strategy.loop import FederatedRun
from fedllm.wire import route_fedllm_logs


def create_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """The ServerApp; `overrides` (flat keys) are laid over the run config, for
    `flwr.simulation.run_simulation`, which passes no run config of its own."""
    server_app = ServerApp()
    route_fedllm_logs()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        main(
            grid,
            {**context.run_config, **(overrides or {})},
            config_sha256=config_digest(context.run_config),
        )

    return server_app


def main(grid: Grid, run_config: dict[str, Any], *, config_sha256: str = "") -> None:
    """Validate the config, check the disk, open (or resume) the run directory, run every
    round; a problem is one line naming it (a failed write also the round kept), no traceback.
    `config_sha256`: the digest of the run config the sites were given (it is signed)."""
    try:
        cfg = parse_config(run_config)
        spec = adapter_spec(cfg.model, cfg.lora)
        run = RunDir.find(cfg)
        done = run.rounds_completed if run else 0
        check_output_folder(RunDir.path_for(cfg), needed=needed_bytes(cfg, spec, rounds_done=done))
        FederatedRun(grid, cfg, run, spec, config_sha256=config_sha256).execute()
    except DiskError as e:
        log(ERROR, "fedllm: %s; the run stops; %s", str(e).rstrip("."), RunDir.left_on_disk(cfg))
    except FedllmError as e:
        log(ERROR, "fedllm: %s", e)


app = create_app()
