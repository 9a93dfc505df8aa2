"""Build the configured Flower strategy; fedllm adds no aggregation maths of its own here."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)

from fedllm.config import FedllmConfig


def build_strategy(cfg: FedllmConfig, *, num_sites: int) -> Strategy:
    """Example-weighted FedAvg (arXiv 1602.05629) or one of Flower's server optimisers.

    Under user-level DP the strategy configures every site and the run loop Poisson-samples
    them itself (`fedllm.privacy.userdp`): fixed-size sampling is not what the accountants
    assume, and the strategy only applies the already-noised mean update.
    """
    s = cfg.strategy
    common = {
        "fraction_train": 1.0 if cfg.privacy.user_level else s.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.run.min_sites,
        "min_evaluate_nodes": min(cfg.run.min_sites, num_sites),
        "min_available_nodes": cfg.run.min_sites,
        "weighted_by_key": "num-examples",
    }
    if s.name == "fedavg":
        return FedAvg(**common)
    if s.name == "fedprox":
        return FedProx(**common, proximal_mu=s.proximal_mu)
    if s.name == "fedavgm":
        return FedAvgM(
            **common, server_learning_rate=s.server_learning_rate, server_momentum=s.server_momentum
        )
    adaptive = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[s.name]
    return adaptive(**common, eta=s.server_learning_rate, eta_l=cfg.train.learning_rate, tau=s.tau)
