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
    cpus_per_site: int = 1,
    total_cpus: int = 2,
) -> None:
    """One run with `overrides` laid over the run config (both apps see them).

    `client_app` replaces the ClientApp (e.g. one that gives a site another node config).
    """
    from flwr.simulation import run_simulation

    from clients.app import create_app as create_client_app
    from server.app import create_app as create_server_app

    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    run_simulation(
        server_app=create_server_app(overrides),
        client_app=client_app or create_client_app(overrides),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": cpus_per_site},
            "init_args": {"num_cpus": total_cpus},
        },
    )
