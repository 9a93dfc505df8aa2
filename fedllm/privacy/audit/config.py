"""The `audit.*` config section: the canaries and secrets of an auditing run."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm.config_fields import field_help, require

__all__ = ["AuditConfig"]


@dataclass
class AuditConfig:
    """An auditing run: canaries that measure privacy empirically (off by default)."""

    canaries: int = field(
        default=0,
        metadata=field_help(
            "membership canaries at the auditing site, each in w.p. 1/2 (0 or >= 1000)"
        ),
    )
    gradient_canaries: int = field(
        default=0,
        metadata=field_help(
            "white-box canaries: virtual records adding C*u_k to the auditing site's clipped "
            "gradient sum, each in w.p. 1/2 (0 or >= 1000)"
        ),
    )
    canary_length: int = field(default=6, metadata=field_help("random words per canary answer"))
    canary_site: int = field(default=0, metadata=field_help("the site that inserts the canaries"))
    canary_seed: int = field(default=1, metadata=field_help("seed of canaries and secrets"))
    secrets: int = field(
        default=0, metadata=field_help("secret-sharer secrets at the auditing site (0: none)")
    )
    secret_repeats: int = field(default=8, metadata=field_help("copies of each secret inserted"))
    secret_alternatives: int = field(
        default=2000, metadata=field_help("random alternatives each secret is ranked against")
    )
    canary_clients: int = field(
        default=0,
        metadata=field_help(
            "user-level canary clients at the server, each in w.p. 1/2 (0 or >= 20)"
        ),
    )

    def __post_init__(self) -> None:
        require(
            self.canaries == 0 or self.canaries >= 1000,
            "audit.canaries",
            self.canaries,
            "must be 0 or at least 1000 (fewer cannot bound epsilon usefully)",
        )
        require(
            self.gradient_canaries == 0 or self.gradient_canaries >= 1000,
            "audit.gradient-canaries",
            self.gradient_canaries,
            "must be 0 or at least 1000",
        )
        require(self.canary_length >= 1, "audit.canary-length", self.canary_length, ">= 1")
        require(self.canary_site >= 0, "audit.canary-site", self.canary_site, ">= 0")
        require(self.secrets >= 0, "audit.secrets", self.secrets, ">= 0")
        require(self.secret_repeats >= 1, "audit.secret-repeats", self.secret_repeats, ">= 1")
        require(
            self.secret_alternatives >= 100,
            "audit.secret-alternatives",
            self.secret_alternatives,
            "must be >= 100",
        )
        require(
            self.canary_clients == 0 or self.canary_clients >= 20,
            "audit.canary-clients",
            self.canary_clients,
            "must be 0 or at least 20",
        )

    @property
    def inserts_data(self) -> bool:
        return self.canaries > 0 or self.secrets > 0

    @property
    def at_site(self) -> bool:
        """Whether the auditing site inserts anything (data rows or gradient canaries)."""
        return self.inserts_data or self.gradient_canaries > 0
