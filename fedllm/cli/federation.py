"""`fedllm federation ...`: Flower connections, written where Flower keeps them.

The one CLI module that imports Flower (an exception to the rule that only the apps,
`fedllm/strategy/`, `fedllm/mods/` and `fedllm/wire.py` do): fedllm keeps no federation
settings of its own, so it writes Flower's connection config with Flower's own helpers
(`flwr.cli`), imported in the handlers because `flwr.cli` takes ~3 s to import.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.errors import KeyFileError

__all__ = ["add_parsers"]


def cmd_federation_setup(args: argparse.Namespace) -> int:
    """Add a local simulation federation of `--sites` sites to Flower's own config file.

    Written with Flower's config helpers into ``$FLWR_HOME/config.toml`` (fedllm keeps no
    federation settings of its own). The connection carries its simulation options, so every
    `flwr run .` gets the same federation even after its local SuperLink restarts (a size
    set with `flwr federation simulation-config` lives in the SuperLink and is lost then).
    It becomes the default only when the default is still Flower's stock `local`.
    """
    # heavy: flwr.cli takes ~3 s to import; keeps `fedllm --help` fast
    from flwr.cli.flower_config import (
        init_flwr_config,
        read_flower_config,
        set_default_superlink_connection,
        write_superlink_connection,
    )
    from flwr.cli.typing import (
        SimulationBackendConfig,
        SimulationClientResources,
        SuperLinkConnection,
        SuperLinkSimulationOptions,
    )

    init_flwr_config()
    connection = SuperLinkConnection(
        name=args.name,
        address=":local:",
        options=SuperLinkSimulationOptions(
            num_supernodes=args.sites,
            backend=SimulationBackendConfig(
                client_resources=SimulationClientResources(num_cpus=args.cpus, num_gpus=0.0)
            ),
        ),
    )
    write_superlink_connection(connection)
    config, path = read_flower_config()
    default = config.get("superlink", {}).get("default")
    if default in (None, "local") or args.make_default:
        set_default_superlink_connection(args.name)
        default = args.name
    print(
        f"Flower connection '{args.name}' ({args.sites} simulated sites, {args.cpus} CPUs each) "
        f"written to {path}; default connection: '{default}'."
    )
    return 0


def cmd_federation_add(args: argparse.Namespace) -> int:
    """A Flower connection to a deployed SuperLink, written with Flower's own helpers."""
    # heavy: flwr.cli takes ~3 s to import; keeps `fedllm --help` fast
    from flwr.cli.flower_config import init_flwr_config, write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    ca = Path(args.root_certificates).resolve()
    if not ca.is_file():
        raise KeyFileError(f"--root-certificates: no file at {ca}.")
    init_flwr_config()
    write_superlink_connection(
        SuperLinkConnection(name=args.name, address=args.address, root_certificates=str(ca))
    )
    print(f"Flower connection '{args.name}' -> {args.address} (TLS, CA {ca}).")
    print(f"Run with: flwr run . {args.name} --stream --run-config configs/deploy.toml")
    return 0


def add_parsers(sub: Any) -> None:
    """`federation setup` (a local simulation) and `federation add` (a deployed SuperLink)."""
    fed = verb_group(sub, "federation", "Flower federations")
    setup = fed.add_parser("setup", help="add a local simulation federation to Flower's config")
    setup.add_argument("--sites", type=int, default=3)
    setup.add_argument("--cpus", type=int, default=2, help="CPUs per simulated site")
    setup.add_argument("--name", default="fedllm-local", help="Flower connection name")
    setup.add_argument(
        "--make-default", action="store_true", help="make it the default even over a custom one"
    )
    setup.set_defaults(func=cmd_federation_setup)
    add = fed.add_parser("add", help="add a Flower connection to a deployed TLS SuperLink")
    add.add_argument("name", help="connection name, e.g. fedllm-deploy")
    add.add_argument("--address", required=True, help="host:port of the SuperLink")
    add.add_argument("--root-certificates", required=True, help="the federation's ca.pem")
    add.set_defaults(func=cmd_federation_add)
