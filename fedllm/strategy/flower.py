"""Flower's strategies by name: the one list `strategy.name` is checked against, and how
each is built from the config. fedllm adds no aggregation maths of its own here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# `cfg` below is a `fedllm.config.FedllmConfig`, left untyped here: fedllm.config imports
# this module for the names, so importing it back (even for types) would be a cycle.
FedllmConfig = Any

__all__ = [
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "build_inner",
    "krum_select",
    "min_replies",
    "sample_size",
]


def _optimiser(cfg: FedllmConfig, num_sites: int) -> dict[str, Any]:
    s = cfg.strategy
    return {"eta": s.server_learning_rate, "eta_l": cfg.train.learning_rate, "tau": s.tau}


# name -> (class in flwr.serverapp.strategy, its extra arguments from the config and the
# number of sites connected)
STRATEGIES: dict[str, tuple[str, Callable[[FedllmConfig, int], dict[str, Any]]]] = {
    "fedavg": ("FedAvg", lambda cfg, n: {}),
    "fedadam": ("FedAdam", _optimiser),
    "fedyogi": ("FedYogi", _optimiser),
    "fedadagrad": ("FedAdagrad", _optimiser),
    "fedavgm": (
        "FedAvgM",
        lambda cfg, n: {
            "server_learning_rate": cfg.strategy.server_learning_rate,
            "server_momentum": cfg.strategy.server_momentum,
        },
    ),
    "fedprox": ("FedProx", lambda cfg, n: {"proximal_mu": cfg.strategy.proximal_mu}),
    "fedmedian": ("FedMedian", lambda cfg, n: {}),
    "fedtrimmedavg": ("FedTrimmedAvg", lambda cfg, n: {"beta": cfg.strategy.trim_beta}),
    "krum": ("Krum", lambda cfg, n: {"num_malicious_nodes": cfg.strategy.tolerated_sites}),
    "multikrum": (
        "MultiKrum",
        lambda cfg, n: {
            "num_malicious_nodes": cfg.strategy.tolerated_sites,
            "num_nodes_to_select": krum_select(cfg, n),
        },
    ),
    "bulyan": ("Bulyan", lambda cfg, n: {"num_malicious_nodes": cfg.strategy.tolerated_sites}),
}

# The Byzantine-robust rules: each aggregates the sites' individual updates (so none can
# run under HE or user-level DP: see `fedllm.config`), and `fedllm.strategy.robust` hands
# them updates, not adapters.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def sample_size(cfg: FedllmConfig, num_sites: int) -> int:
    """How many sites Flower's strategies ask to train in a round (their own formula:
    `max(int(num_nodes * fraction_train), min_train_nodes)`)."""
    return max(int(num_sites * cfg.strategy.fraction_train), cfg.run.min_sites)


def krum_select(cfg: FedllmConfig, num_sites: int) -> int:
    """MultiKrum's m: as configured, or the sites sampled minus the tolerated ones."""
    s = cfg.strategy
    if s.krum_select:
        return int(s.krum_select)
    return max(1, sample_size(cfg, num_sites) - s.tolerated_sites)


def min_replies(cfg: FedllmConfig) -> tuple[int, str]:
    """The fewest updates a round needs for the configured rule to tolerate what it claims,
    and why: Krum and MultiKrum need n >= 2f + 3 (Blanchard et al. 2017), Bulyan n >= 4f + 3
    (El Mhamdi et al. 2018), a median 2f + 1 (a majority of honest updates), a trimmed mean
    one cut update at each end (int(beta * n) >= 1). Other rules: 1."""
    s = cfg.strategy
    f = s.tolerated_sites
    if s.name in ("krum", "multikrum"):
        return 2 * f + 3, f"{s.name} tolerates {f} hostile sites only with n >= 2f + 3"
    if s.name == "bulyan":
        return 4 * f + 3, f"bulyan tolerates {f} hostile sites only with n >= 4f + 3"
    if s.name == "fedmedian":
        return 2 * f + 1, f"a median tolerates {f} hostile sites only with n >= 2f + 1"
    if s.name == "fedtrimmedavg":
        n = 1
        while int(s.trim_beta * n) < 1:  # Flower's cut: int(beta * n) at each end
            n += 1
        return n, f"fedtrimmedavg with beta = {s.trim_beta:g} cuts nothing below n = {n}"
    return 1, ""


def build_inner(cfg: FedllmConfig, *, num_sites: int, sample_all: bool = False) -> Any:
    """Example-weighted FedAvg (arXiv 1602.05629) or one of Flower's server optimisers.

    Returns a `flwr.serverapp.strategy.Strategy`. With `sample_all` (a stage samples the
    sites: user-level DP, or its non-DP canary-client baseline) the strategy configures
    every site and the user-level stage Poisson-samples them itself
    (`fedllm.privacy.userdp`): fixed-size sampling is not what the accountants assume, and
    the strategy only applies the already-noised mean update.
    """
    # heavy (~0.5 s): Flower's strategies load when the coordinator builds its strategy, not
    # whenever a config is parsed (fedllm.config imports this module for the names).
    import flwr.serverapp.strategy as flower

    class_name, extra = STRATEGIES[cfg.strategy.name]
    common = {
        "fraction_train": 1.0 if sample_all else cfg.strategy.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.run.min_sites,
        "min_evaluate_nodes": min(cfg.run.min_sites, num_sites),
        "min_available_nodes": cfg.run.min_sites,
        "weighted_by_key": "num-examples",
    }
    return getattr(flower, class_name)(**common, **extra(cfg, num_sites))
