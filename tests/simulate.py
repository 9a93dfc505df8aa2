"""Run fedllm's real ServerApp and ClientApp on Flower's Simulation Engine, in-process.

For tests and benchmarks (the `fedllm` library never imports the apps). Users go through
`flwr run .`, which starts a SuperLink and reads its config from files; this takes a dict of
overrides instead.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["simulate"]


def simulate(
    overrides: dict[str, Any],
    *,
    sites: int = 3,
    client_app: Any = None,
    server_app: Any = None,
    cpus_per_site: int = 2,
    total_cpus: int = 2,
) -> None:
    """One run with `overrides` laid over the run config (both apps see them).

    `client_app` replaces the ClientApp (e.g. one that gives a site another node config),
    `server_app` the ServerApp (e.g. one that warms the sites up before fedllm's main).
    Ray is started by the first run and kept for the next ones in this process (see
    `_keep_ray_between_runs`). By default one Ray actor (one process) serves every site in
    turn: starting an actor costs ~10 CPU-seconds (torch, transformers, Opacus, Flower), more
    than a tiny site trains, and the test suite runs two simulations side by side on 2 cores.
    """
    from flwr.simulation import run_simulation

    from clients.app import create_app as create_client_app
    from server.app import create_app as create_server_app

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    _keep_ray_between_runs()
    run_simulation(
        server_app=server_app or create_server_app(overrides),
        client_app=client_app or create_client_app(overrides),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site},
            "init_args": {"num_cpus": total_cpus},
        },
    )


def _keep_ray_between_runs() -> None:
    """Let Flower's Ray backend stop its actors at the end of a run but leave Ray running.

    Flower 1.41's `RayBackend.terminate` ends with `ray.shutdown()`, and the next run's backend
    starts a new local cluster (GCS, raylet and six Python helper processes: ~6 CPU-seconds
    and ~6 s). Its `init_ray` already reuses a running cluster, so only the shutdown is
    dropped here; every run still gets its own actors (new processes), its own pool and its
    own messages. `tests/conftest.py` stops Ray after each test module (and it stops anyway
    when this process exits, as for any driver that started it).
    """
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    if getattr(RayBackend.terminate, "keeps_ray", False):
        return

    def terminate(self: RayBackend) -> None:
        if self.pool:
            self.pool.terminate_all_actors()

    terminate.keeps_ray = True  # type: ignore[attr-defined]
    RayBackend.terminate = terminate  # type: ignore[method-assign]
