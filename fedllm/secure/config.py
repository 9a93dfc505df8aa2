"""The `he.*` and `security.*` config sections: homomorphic aggregation, signed updates and
encryption at rest."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedllm.config_fields import field_help, require
from fedllm.secure.he_params import HEParams, problems

__all__ = ["HE_DROPOUT", "NOISE_ASSUMPTIONS", "HEConfig", "SecurityConfig"]

HE_DROPOUT = ("account", "abort")
# Who may look at the decrypted sum: every site decrypts it and knows its own noise share.
NOISE_ASSUMPTIONS = ("curious-site", "honest-sites")


@dataclass
class HEConfig:
    """Homomorphic aggregation (TenSEAL CKKS), used when strategy.secure-aggregation = "he".

    The parameters are the key ceremony's (`fedllm keys he-init` reads them); every party
    checks its context against them at start.
    """

    poly_modulus_degree: int = field(default=8192, metadata=field_help("CKKS ring degree N"))
    coeff_mod_bit_sizes: str = field(
        default="60,60",
        metadata=field_help("bits per prime of the coefficient modulus; additions need only two"),
    )
    scale_bits: int = field(default=50, metadata=field_help("CKKS scale 2^s: fractional precision"))
    public_context: str = field(
        default="keys/he/public.context",
        metadata=field_help("the coordinator's context: public key only, it cannot decrypt"),
    )
    site_context: str = field(
        default="keys/he/secret.context",
        metadata=field_help("a site's secret context (a node config `he-context` overrides it)"),
    )
    on_dropout: str = field(
        default="account",
        metadata=field_help(
            "distributed DP when sites drop: account the noise actually present, or abort "
            "the round",
            HE_DROPOUT,
        ),
    )
    noise_assumption: str = field(
        default="curious-site",
        metadata=field_help(
            "distributed DP is accounted at the noise a site that subtracts its own share "
            "still faces (curious-site, the weaker guarantee), or at every share present "
            "(honest-sites: no site looks at the sum without its own noise)",
            NOISE_ASSUMPTIONS,
        ),
    )

    def __post_init__(self) -> None:
        for key, why in problems(self.params):
            value = {
                "he.poly-modulus-degree": self.poly_modulus_degree,
                "he.coeff-mod-bit-sizes": self.coeff_mod_bit_sizes,
                "he.scale-bits": self.scale_bits,
            }[key]
            require(False, key, value, why)

    @property
    def params(self) -> HEParams:
        return HEParams.parse(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits)


@dataclass
class SecurityConfig:
    """Who may send updates, and what is kept encrypted at rest (see `fedllm pki`).

    Transport (TLS, node authentication) is the SuperLink's and SuperNodes' command line;
    these keys are what the two apps enforce on top of it.
    """

    sign_updates: bool = field(
        default=False,
        metadata=field_help(
            "every site signs its update (Ed25519 over run, round, node and payload hash); "
            "the coordinator refuses unsigned, tampered or replayed ones"
        ),
    )
    registry: str = field(
        default="keys/pki/registry.json",
        metadata=field_help("the coordinator's registry of site signing keys (`fedllm pki init`)"),
    )
    coordinator_key: str = field(
        default="keys/pki/superlink/coordinator.key",
        metadata=field_help(
            "the coordinator's Ed25519 key (`fedllm pki init`): signs the registry, every "
            "instruction and the run's manifest"
        ),
    )
    coordinator_public_key: str = field(
        default="keys/pki/coordinator.pub",
        metadata=field_help(
            "the coordinator's public key a simulated site checks instructions with; a "
            "deployed site names its own copy in its node config (`coordinator-key`)"
        ),
    )
    site_signing_key: str = field(
        default="keys/pki/sites/site-{partition}/signing.key",
        metadata=field_help(
            "a site's Ed25519 key ({partition} = its partition-id); a node config "
            "`signing-key` overrides it"
        ),
    )
    at_rest_key: str = field(
        default="",
        metadata=field_help(
            "a 32-byte key file (`fedllm keys at-rest-init`): checkpoints and ledgers are "
            "written AES-256-GCM encrypted under it; empty: plaintext"
        ),
    )
