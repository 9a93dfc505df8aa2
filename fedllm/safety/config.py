"""The `safety.*` config section: screening the global model and sites' training data."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm.config_fields import field_help, require

__all__ = ["GATE_ACTIONS", "GATE_RULE", "SafetyConfig"]

GATE_ACTIONS = ("rollback", "stop", "record")


GATE_RULE = (
    "trips when the lower end of the 95% interval of the rise in harmful compliance over the "
    "base model's (Newcombe's, from two Wilson intervals) is above max_rise_points"
)


@dataclass
class SafetyConfig:
    """Content safety: the global model screened every k rounds, and sites' training data.

    Screening asks the candidate global model the probe prompts at the coordinator, which
    therefore needs the base model and the adapter in plaintext (not under HE). The gate
    compares the harmful-compliance rate with the base model's, screened first as round 0;
    `gate-action = "record"` only records, which is how the gate is switched off.
    """

    screen_every: int = field(
        default=0,
        metadata=field_help(
            "screen the global model every k rounds and at the last round (0: off); the base "
            "model is screened first, as round 0, for reference"
        ),
    )
    filter: str = field(
        default="lexicon",
        metadata=field_help(
            "safety filter: lexicon, response[:DIR] (answer judged with its prompt), "
            "embedding[:DIR], hf:ID, guard:ID, judge:MODEL"
        ),
    )
    probes: str = field(
        default="bundled:probes-fast",
        metadata=field_help("probe prompts: bundled:NAME or a CSV/JSONL file (label 1 = harmful)"),
    )
    max_probes: int = field(
        default=64, metadata=field_help("probes asked per screening, stratified by label (0: all)")
    )
    max_new_tokens: int = field(
        default=64, metadata=field_help("length bound of each answer (greedy decoding)")
    )
    gate_max_rise: float = field(
        default=0.0,
        metadata=field_help(
            "percentage points of rise in harmful compliance over the base model's that are "
            "tolerated: the gate trips when the lower end of the rise's 95% interval "
            "(Newcombe) is above it; 0 trips on any rise the probes can tell from noise"
        ),
    )
    gate_action: str = field(
        default="rollback",
        metadata=field_help(
            "a tripped gate: rollback (keep the previous global adapter), stop the run (after "
            "rolling back), or record only",
            GATE_ACTIONS,
        ),
    )
    screen_site_data: bool = field(
        default=False,
        metadata=field_help(
            "each site drops the training examples the filter flags before training; only "
            "their count leaves the site"
        ),
    )
    site_data_threshold: float = field(
        default=0.0,
        metadata=field_help("harm score at which a site drops an example (0: the filter's own)"),
    )

    def __post_init__(self) -> None:
        require(self.screen_every >= 0, "safety.screen-every", self.screen_every, ">= 0")
        require(bool(self.filter.strip()), "safety.filter", self.filter, "names no filter")
        require(bool(self.probes.strip()), "safety.probes", self.probes, "names no probe set")
        require(
            self.max_probes == 0 or self.max_probes >= 2,
            "safety.max-probes",
            self.max_probes,
            "must be 0 (all) or at least 2 (one harmful, one benign)",
        )
        require(self.max_new_tokens >= 1, "safety.max-new-tokens", self.max_new_tokens, ">= 1")
        require(
            0 <= self.gate_max_rise <= 100,
            "safety.gate-max-rise",
            self.gate_max_rise,
            "must be in [0, 100] percentage points",
        )
        require(
            0 <= self.site_data_threshold <= 1,
            "safety.site-data-threshold",
            self.site_data_threshold,
            "must be in [0, 1] (0: the filter's own threshold)",
        )

    @property
    def screens(self) -> bool:
        """Whether the global model is screened at all."""
        return self.screen_every > 0

    def screens_round(self, server_round: int, last_round: int) -> bool:
        """Every `screen-every` rounds, and the last one (the adapter that ships)."""
        return self.screens and (
            server_round % self.screen_every == 0 or server_round == last_round
        )
