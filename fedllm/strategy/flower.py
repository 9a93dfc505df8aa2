"""Flower's strategies by name: the one list `strategy.name` is checked against, and how
each is built from the config. fedllm adds no aggregation maths of its own here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# `cfg` below is a `fedllm.config.FedllmConfig`, left untyped here: fedllm.config imports
# this module for the names, so importing it back (even for types) would be a cycle.
FedllmConfig = Any

__all__ = ["STRATEGIES", "build_inner"]


def _optimiser(cfg: FedllmConfig) -> dict[str, Any]:
    s = cfg.strategy
    return {"eta": s.server_learning_rate, "eta_l": cfg.train.learning_rate, "tau": s.tau}


# name -> (class in flwr.serverapp.strategy, its extra arguments from the config)
STRATEGIES: dict[str, tuple[str, Callable[[FedllmConfig], dict[str, Any]]]] = {
    "fedavg": ("FedAvg", lambda cfg: {}),
    "fedadam": ("FedAdam", _optimiser),
    "fedyogi": ("FedYogi", _optimiser),
    "fedadagrad": ("FedAdagrad", _optimiser),
    "fedavgm": (
        "FedAvgM",
        lambda cfg: {
            "server_learning_rate": cfg.strategy.server_learning_rate,
            "server_momentum": cfg.strategy.server_momentum,
        },
    ),
    "fedprox": ("FedProx", lambda cfg: {"proximal_mu": cfg.strategy.proximal_mu}),
}


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
    return getattr(flower, class_name)(**common, **extra(cfg))
