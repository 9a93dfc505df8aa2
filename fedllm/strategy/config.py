"""The `validate.*` run-config section: the bounds the coordinator holds every update to
(`fedllm.strategy.validate`). No Flower here: `fedllm.config` imports it."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm.config_fields import field_help, require

__all__ = ["ValidateConfig"]


@dataclass
class ValidateConfig:
    """What an update must satisfy before it may touch the aggregate."""

    max_update_norm: float = field(
        default=1e5,
        metadata=field_help(
            "largest L2 norm of a site's update (its adapter minus the global one) accepted: "
            "a bound on scale (no overflow, no 1e300), not a defence against poisoning"
        ),
    )
    max_examples: int = field(
        default=10_000_000,
        metadata=field_help(
            "largest example count (FedAvg weight) a site may claim, on top of its own count "
            "reported before round 1"
        ),
    )

    def __post_init__(self) -> None:
        require(
            self.max_update_norm > 0,
            "validate.max-update-norm",
            self.max_update_norm,
            "must be positive",
        )
        require(self.max_examples >= 1, "validate.max-examples", self.max_examples, "must be >= 1")
