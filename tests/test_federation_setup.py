"""`fedllm federation setup`: the simulation's resources, as Flower itself reads them back.

Each test writes a connection into a fresh FLWR_HOME and reads it through Flower 1.41's own
path to Ray: the connection file (`read_superlink_connection`), the `SimulationConfig` proto
`flwr run` sends its local SuperLink (`_parse_deprecated_options`), and the backend config the
simulation hands `ray.init` and its actors (`_run_simulation_settings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedllm.cli import main as cli
from fedllm.cli.federation import auto_gpus_per_site, simulation_resources
from fedllm.errors import ConfigError


def _ray_config(home: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, Any]:
    """Run the verb, then what Flower 1.41 makes of the written connection: the number of
    sites and Ray's backend config."""
    # heavy: Flower's CLI and simulation modules take seconds to import; only these tests
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.run.run import _parse_deprecated_options
    from flwr.simulation.app import _run_simulation_settings

    monkeypatch.setenv("FLWR_HOME", str(home))
    assert cli(["federation", "setup", *argv]) == 0
    sim = _parse_deprecated_options(read_superlink_connection("fedllm-local"))
    sites, backend, config, _, _ = _run_simulation_settings(sim)
    assert backend == "ray"
    return sites, config


def test_default_setup_is_what_install_sh_always_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--sites 3 --cpus 2` (install.sh) writes 2 whole CPUs and no GPU per site and leaves
    Ray's own CPU count alone, exactly as before the resources flags existed."""
    # Execute
    sites, config = _ray_config(tmp_path, monkeypatch, "--sites", "3", "--cpus", "2")
    # Assert
    assert sites == 3
    assert config == {"client_resources": {"num_cpus": 2, "num_gpus": 0.0}, "init_args": {}}
    text = (tmp_path / "config.toml").read_text()
    assert "init-args" not in text
    assert 'default = "fedllm-local"' in text


def test_sites_per_core_reaches_ray_as_logical_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four sites a core on 2 cores: each site asks 1 of 8 logical CPUs (Flower's proto
    carries a site's CPUs as a whole number), with its GPU share."""
    # Execute
    sites, config = _ray_config(
        tmp_path,
        monkeypatch,
        *("--sites", "1000", "--sites-per-core", "4", "--cores", "2", "--gpus", "0.125"),
    )
    # Assert
    assert sites == 1000
    assert config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.125}
    assert config["init_args"] == {"num_cpus": 8}


def test_half_a_cpu_per_site_is_two_sites_a_core() -> None:
    """`--cpus 0.5` and `--sites-per-core 2` are one setting; whole CPUs pass as they are."""
    assert simulation_resources(cpus_per_site=0.5, gpus_per_site=0, cores=16) == (1, 32, 0.0)
    assert simulation_resources(cpus_per_site=3, gpus_per_site=0.5, cores=16) == (3, None, 0.5)


@pytest.mark.parametrize(
    ("cpus", "gpus", "match"),
    [(0, 0, "--cpus must be positive"), (1, 1.5, "--gpus must be a fraction")],
)
def test_impossible_resources_are_refused(cpus: float, gpus: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        simulation_resources(cpus_per_site=cpus, gpus_per_site=gpus, cores=2)


def test_auto_gpu_share_splits_the_gpus_among_concurrent_sites() -> None:
    """8 cores at 2 CPUs a site run 4 sites at once: one GPU gives each a quarter; no GPU, 0."""
    assert auto_gpus_per_site(gpus=1, cores=8, cpus_per_site=2) == 0.25
    assert auto_gpus_per_site(gpus=8, cores=8, cpus_per_site=2) == 1.0
    assert auto_gpus_per_site(gpus=0, cores=8, cpus_per_site=2) == 0.0
