"""`fedllm federation ...`: Flower connections, written where Flower keeps them.

The one CLI module that imports Flower (an exception to the rule that only the apps,
`fedllm/strategy/`, `fedllm/mods/` and `fedllm/wire.py` do): fedllm keeps no federation
settings of its own, so it writes Flower's connection config with Flower's own helpers
(`flwr.cli`), imported in the handlers because `flwr.cli` takes ~3 s to import.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fedllm.cli.common import verb_group
from fedllm.errors import ConfigError, KeyFileError

__all__ = ["add_parsers", "auto_gpus_per_site", "simulation_resources"]


def simulation_resources(
    *, cpus_per_site: float, gpus_per_site: float, cores: int
) -> tuple[int, int | None, float]:
    """Ray's resources for a simulation: (CPUs per site, Ray's logical CPUs or None, GPUs
    per site).

    Flower 1.41 carries a site's CPUs to its SuperLink as a whole number (the
    `SimulationConfig` proto's `client_resources_num_cpus` is a uint32: 0.5 raises there),
    and Ray's CPUs are logical: a site that asks for 1 of `round(cores / c)` logical CPUs gets
    `c` of a real core. So a fractional `cpus_per_site` becomes 1 CPU per site and Ray told
    of `cores / c` CPUs; a whole number is written as it is, with Ray's count left to Ray
    (every core), as before. Pure.
    """
    if cpus_per_site <= 0:
        raise ConfigError(f"--cpus must be positive, got {cpus_per_site:g}.")
    if not 0 <= gpus_per_site <= 1:
        raise ConfigError(f"--gpus must be a fraction of one GPU in [0, 1], got {gpus_per_site:g}.")
    if float(cpus_per_site).is_integer():
        return int(cpus_per_site), None, float(gpus_per_site)
    logical = max(1, round(cores / cpus_per_site))
    return 1, logical, float(gpus_per_site)


def auto_gpus_per_site(*, gpus: int, cores: int, cpus_per_site: float) -> float:
    """A GPU share per site for `--gpus auto`: the GPUs split among the sites that can run
    at once on the CPUs (a 135M model needs a small slice of one), at most one each; 0
    without GPUs. Pure."""
    if gpus <= 0:
        return 0.0
    concurrent = max(1, int(cores / cpus_per_site))
    return min(1.0, round(gpus / concurrent, 4))


def visible_gpus() -> int:
    """NVIDIA GPUs this machine shows, without importing torch (~10 s): the driver's
    per-GPU folders, narrowed by CUDA_VISIBLE_DEVICES when set."""
    found = len(list(Path("/proc/driver/nvidia/gpus").glob("*")))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        found = min(found, len([d for d in visible.split(",") if d.strip() not in ("", "-1")]))
    return found


def cmd_federation_setup(args: argparse.Namespace) -> int:
    """Add a local simulation federation of `--sites` sites to Flower's own config file.

    Written with Flower's config helpers into ``$FLWR_HOME/config.toml`` (fedllm keeps no
    federation settings of its own). The connection carries its simulation options, so every
    `flwr run .` gets the same federation even after its local SuperLink restarts (a size
    set with `flwr federation simulation-config` lives in the SuperLink and is lost then).
    It becomes the default only when the default is still Flower's stock `local`.
    Resources: `simulation_resources` (docs/simulation.md).
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
        SimulationInitArgs,
        SuperLinkConnection,
        SuperLinkSimulationOptions,
    )

    if args.sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {args.sites}.")
    cores = args.cores or os.cpu_count() or 1
    if args.sites_per_core is not None and args.sites_per_core <= 0:
        raise ConfigError(f"--sites-per-core must be positive, got {args.sites_per_core:g}.")
    cpus = 1.0 / args.sites_per_core if args.sites_per_core else args.cpus
    if args.gpus == "auto":
        gpus = auto_gpus_per_site(gpus=visible_gpus(), cores=cores, cpus_per_site=cpus)
    else:
        try:
            gpus = float(args.gpus)
        except ValueError:
            raise ConfigError(f"--gpus must be a number or 'auto', got {args.gpus!r}.") from None
    site_cpus, ray_cpus, site_gpus = simulation_resources(
        cpus_per_site=cpus, gpus_per_site=gpus, cores=cores
    )
    init_flwr_config()
    connection = SuperLinkConnection(
        name=args.name,
        address=":local:",
        options=SuperLinkSimulationOptions(
            num_supernodes=args.sites,
            backend=SimulationBackendConfig(
                client_resources=SimulationClientResources(num_cpus=site_cpus, num_gpus=site_gpus),
                init_args=SimulationInitArgs(num_cpus=ray_cpus) if ray_cpus else None,
            ),
        ),
    )
    write_superlink_connection(connection)
    config, path = read_flower_config()
    default = config.get("superlink", {}).get("default")
    if default in (None, "local") or args.make_default:
        set_default_superlink_connection(args.name)
        default = args.name
    shared = f" (Ray told of {ray_cpus} CPUs: {cpus:g} of a core each)" if ray_cpus else ""
    gpu = f", {site_gpus:g} GPU each" if site_gpus else ""
    print(
        f"Flower connection '{args.name}' ({args.sites} simulated sites, {site_cpus} CPUs "
        f"each{shared}{gpu}) written to {path}; default connection: '{default}'."
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
    per_site = setup.add_mutually_exclusive_group()
    per_site.add_argument(
        "--cpus", type=float, default=2, help="CPUs per simulated site; 0.5: two sites a core"
    )
    per_site.add_argument(
        "--sites-per-core", type=float, default=None, help="sites sharing one core (1/--cpus)"
    )
    setup.add_argument(
        "--gpus",
        default="0",
        help="GPU share per site, e.g. 0.25; 'auto': the GPUs split among the sites that run "
        "at once (0 without GPUs)",
    )
    setup.add_argument(
        "--cores", type=int, default=0, help="cores Ray may use for fractional CPUs (0: all)"
    )
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
