"""The run configuration: one validated, typed object built from Flower's flat run config.

Flower hands an app a flat mapping of dotted keys (``privacy.noise-multiplier = 0.8``). This
module turns it into nested dataclasses (``cfg.privacy.noise_multiplier``), refusing unknown
keys, wrong types and out-of-range values with one sentence that quotes the key and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedllm.errors import ConfigError
from fedllm.secure.he_params import HEParams, problems
from fedllm.strategy.flower import STRATEGIES as FLOWER_STRATEGIES

__all__ = [
    "AuditConfig",
    "DataConfig",
    "EvalConfig",
    "FedllmConfig",
    "HEConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SafetyConfig",
    "SecurityConfig",
    "StrategyConfig",
    "TrainConfig",
    "config_hash",
    "flatten",
    "parse_config",
]

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "chatterbot"

STRATEGIES = tuple(FLOWER_STRATEGIES)  # the one list: fedllm.strategy.flower
ACCOUNTANTS = ("rdp", "prv", "pld")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
PARTITIONERS = ("by-category", "iid", "dirichlet")
PRIVACY_MODES = ("record", "user", "record+user", "none")
USER_CLIPPING = ("fixed", "adaptive")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
SECURE_AGGREGATION = ("none", "he")
HE_DROPOUT = ("account", "abort")
GATE_ACTIONS = ("rollback", "stop", "record")


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"help": text, "choices": choices}


@dataclass
class RunConfig:
    """What the run is called, where it lives and how long it lasts."""

    name: str = field(
        default="", metadata=_help("run directory under output-dir; empty: a new timestamped run")
    )
    output_dir: str = field(default="outputs", metadata=_help("parent of run directories"))
    rounds: int = field(default=3, metadata=_help("number of federated rounds"))
    seed: int = field(default=0, metadata=_help("seed shared by all sites (LoRA init, splits)"))
    min_sites: int = field(default=2, metadata=_help("fewest sites that must train in a round"))
    timeout: float = field(default=3600.0, metadata=_help("seconds to wait for replies a round"))

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, "run.rounds", self.rounds, "must be at least 1")
        _require(self.min_sites >= 1, "run.min-sites", self.min_sites, "must be at least 1")
        _require(self.timeout > 0, "run.timeout", self.timeout, "must be positive")
        _require(
            "/" not in self.name and self.name not in (".", ".."),
            "run.name",
            self.name,
            "must be a plain directory name",
        )


@dataclass
class ModelConfig:
    """The base causal LM every site loads locally (it never travels)."""

    name: str = field(
        default=EMBEDDED_MODEL,
        metadata=_help("hub id, local directory, or the embedded default"),
    )
    gguf_file: str = field(default="", metadata=_help("GGUF file inside `name`, if any"))
    dtype: str = field(default="auto", metadata=_help("auto: bf16 on CUDA, fp32 on CPU", DTYPES))
    quantization: str = field(
        default="none", metadata=_help("4bit/8bit base weights (QLoRA, CUDA only)", QUANTIZATIONS)
    )
    trust_remote_code: bool = field(default=False, metadata=_help("allow hub model code"))


@dataclass
class LoraConfig:
    """The LoRA adapter: the only tensors that leave a site."""

    rank: int = field(default=8, metadata=_help("LoRA rank r"))
    alpha: float = field(default=16.0, metadata=_help("LoRA scaling alpha"))
    dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input"))
    target_modules: str = field(
        default="q_proj,v_proj", metadata=_help("comma-separated module names to adapt")
    )
    ffa: bool = field(
        default=True,
        metadata=_help("FFA-LoRA: A frozen from the shared seed, only B trained and sent"),
    )

    def __post_init__(self) -> None:
        _require(self.rank >= 1, "lora.rank", self.rank, "must be at least 1")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "must be positive")
        _require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        _require(bool(self.modules), "lora.target-modules", self.target_modules, "names no module")

    @property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class DataConfig:
    """Where each site's private examples come from and how they are split."""

    source: str = field(
        default=EMBEDDED_DATA,
        metadata=_help("chatterbot, a local .jsonl/.csv file or dir, or a hub dataset id"),
    )
    partitioner: str = field(
        default="by-category", metadata=_help("how examples are split into sites", PARTITIONERS)
    )
    dirichlet_alpha: float = field(default=0.5, metadata=_help("concentration for dirichlet"))
    prompt_field: str = field(default="prompt", metadata=_help("column holding the prompt"))
    response_field: str = field(default="response", metadata=_help("column holding the answer"))
    category_field: str = field(default="category", metadata=_help("column holding the topic"))
    eval_fraction: float = field(default=0.1, metadata=_help("held-out share of each site"))
    max_length: int = field(default=128, metadata=_help("token limit per example"))

    def __post_init__(self) -> None:
        _require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "> 0")
        _require(0 < self.eval_fraction < 1, "data.eval-fraction", self.eval_fraction, "in (0, 1)")
        _require(self.max_length >= 8, "data.max-length", self.max_length, "must be >= 8")


@dataclass
class TrainConfig:
    """The local optimisation each site runs per round."""

    local_steps: int = field(default=2, metadata=_help("optimizer steps per round per site"))
    batch_size: int = field(
        default=32, metadata=_help("expected logical batch (Poisson rate = batch / examples)")
    )
    physical_batch_size: int = field(default=8, metadata=_help("micro-batch held in memory"))
    learning_rate: float = field(default=3e-3, metadata=_help("local learning rate"))
    optimizer: str = field(default="adamw", metadata=_help("local optimizer", OPTIMIZERS))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    device: str = field(default="auto", metadata=_help("auto: CUDA when present", DEVICES))

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local-steps", self.local_steps, "must be >= 1")
        _require(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _require(
            self.physical_batch_size >= 1,
            "train.physical-batch-size",
            self.physical_batch_size,
            "must be >= 1",
        )
        _require(self.learning_rate > 0, "train.learning-rate", self.learning_rate, "> 0")
        _require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, ">= 0")


@dataclass
class PrivacyConfig:
    """Record-level DP-SGD (Opacus) at every site and/or user-level DP-FedAvg at the server.

    The two guarantees protect different units (one example vs. one site's whole dataset)
    and are accounted, recorded and reported separately, never combined into one number.
    """

    mode: str = field(
        default="record",
        metadata=_help(
            "record: DP-SGD at every site; user: DP-FedAvg over whole sites; record+user: both, "
            "reported separately; none: no formal guarantee",
            PRIVACY_MODES,
        ),
    )
    noise_multiplier: float = field(
        default=0.8, metadata=_help("sigma; ignored when target-epsilon is set")
    )
    target_epsilon: float = field(
        default=0.0,
        metadata=_help("if > 0, sigma is calibrated so the whole run spends this epsilon"),
    )
    epsilon_max: float = field(
        default=0.0,
        metadata=_help(
            "each site's hard epsilon budget; 0: target-epsilon if set, else none "
            "(a site may lower it with `epsilon-max` in its node config)"
        ),
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("per-example clipping norm"))
    delta: float = field(
        default=0.0, metadata=_help("0: 0.1 / (training examples at the site), below 1/n")
    )
    accountant: str = field(default="prv", metadata=_help("Opacus accountant", ACCOUNTANTS))
    grad_sample_mode: str = field(
        default="hooks", metadata=_help("Opacus per-sample gradients", GRAD_SAMPLE_MODES)
    )
    user_noise_multiplier: float = field(
        default=1.0, metadata=_help("user-level z: noise std = z * clip on the sum of updates")
    )
    user_clip: float = field(
        default=1.0, metadata=_help("user-level L2 clip S of a site's whole update (initial S)")
    )
    user_clipping: str = field(
        default="fixed", metadata=_help("fixed S, or adaptive (Andrew et al. 2021)", USER_CLIPPING)
    )
    user_target_quantile: float = field(
        default=0.5, metadata=_help("adaptive: share of updates meant to fall under S")
    )
    user_clip_learning_rate: float = field(
        default=0.2, metadata=_help("adaptive: geometric step size of S per round")
    )
    user_count_stddev: float = field(
        default=0.0,
        metadata=_help("adaptive: noise std on the unclipped count; 0: expected sites / 20"),
    )
    user_delta: float = field(default=1e-5, metadata=_help("user-level delta"))
    user_epsilon_max: float = field(
        default=0.0, metadata=_help("user-level epsilon budget of the run; 0: none")
    )

    def __post_init__(self) -> None:
        if self.user_level:
            _require(
                self.user_noise_multiplier > 0,
                "privacy.user-noise-multiplier",
                self.user_noise_multiplier,
                "must be > 0 in user-level mode",
            )
            _require(self.user_clip > 0, "privacy.user-clip", self.user_clip, "must be > 0")
            _require(
                0 < self.user_target_quantile < 1,
                "privacy.user-target-quantile",
                self.user_target_quantile,
                "must be in (0, 1)",
            )
            _require(
                self.user_clip_learning_rate > 0,
                "privacy.user-clip-learning-rate",
                self.user_clip_learning_rate,
                "must be > 0",
            )
            _require(
                self.user_count_stddev >= 0,
                "privacy.user-count-stddev",
                self.user_count_stddev,
                "must be >= 0",
            )
            _require(0 < self.user_delta < 1, "privacy.user-delta", self.user_delta, "in (0, 1)")
            _require(
                self.user_epsilon_max >= 0,
                "privacy.user-epsilon-max",
                self.user_epsilon_max,
                "must be >= 0 (0 = no budget)",
            )
        if not self.record_level:
            return
        _require(
            self.noise_multiplier >= 0,
            "privacy.noise-multiplier",
            self.noise_multiplier,
            "must be >= 0",
        )
        _require(
            self.target_epsilon >= 0,
            "privacy.target-epsilon",
            self.target_epsilon,
            "must be >= 0 (0 = use noise-multiplier)",
        )
        _require(self.max_grad_norm > 0, "privacy.max-grad-norm", self.max_grad_norm, "must be > 0")
        _require(0 <= self.delta < 1, "privacy.delta", self.delta, "must be in [0, 1)")

    @property
    def record_level(self) -> bool:
        """DP-SGD at every site (example-level guarantee)."""
        return self.mode in ("record", "record+user")

    @property
    def user_level(self) -> bool:
        """DP-FedAvg at the server (site-level guarantee)."""
        return self.mode in ("user", "record+user")


@dataclass
class StrategyConfig:
    """How the server combines adapter updates (Flower's strategies)."""

    name: str = field(default="fedavg", metadata=_help("aggregation strategy", STRATEGIES))
    fraction_train: float = field(default=1.0, metadata=_help("share of sites asked to train"))
    server_learning_rate: float = field(default=0.1, metadata=_help("eta for FedAdam/Yogi/..."))
    server_momentum: float = field(default=0.9, metadata=_help("momentum for FedAvgM"))
    proximal_mu: float = field(default=0.01, metadata=_help("FedProx proximal term weight"))
    tau: float = field(default=1e-3, metadata=_help("adaptivity for FedAdam/Yogi/Adagrad"))
    secure_aggregation: str = field(
        default="none",
        metadata=_help(
            "he: sites send CKKS ciphertexts and the server sums what it cannot read",
            SECURE_AGGREGATION,
        ),
    )

    def __post_init__(self) -> None:
        _require(
            0 < self.fraction_train <= 1,
            "strategy.fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        _require(
            self.server_learning_rate > 0,
            "strategy.server-learning-rate",
            self.server_learning_rate,
            "must be > 0",
        )
        _require(self.proximal_mu >= 0, "strategy.proximal-mu", self.proximal_mu, ">= 0")
        _require(
            0 <= self.server_momentum < 1,
            "strategy.server-momentum",
            self.server_momentum,
            "must be in [0, 1)",
        )
        _require(self.tau > 0, "strategy.tau", self.tau, "must be > 0")


@dataclass
class EvalConfig:
    """Federated evaluation of the global adapter on each site's held-out split."""

    max_examples: int = field(default=16, metadata=_help("held-out examples per site"))
    batch_size: int = field(default=8, metadata=_help("evaluation batch size"))

    def __post_init__(self) -> None:
        _require(self.max_examples >= 1, "eval.max-examples", self.max_examples, ">= 1")
        _require(self.batch_size >= 1, "eval.batch-size", self.batch_size, ">= 1")


@dataclass
class AuditConfig:
    """An auditing run: canaries that measure privacy empirically (off by default)."""

    canaries: int = field(
        default=0,
        metadata=_help("membership canaries at the auditing site, each in w.p. 1/2 (0 or >= 1000)"),
    )
    gradient_canaries: int = field(
        default=0,
        metadata=_help(
            "white-box canaries: virtual records adding C*u_k to the auditing site's clipped "
            "gradient sum, each in w.p. 1/2 (0 or >= 1000)"
        ),
    )
    canary_length: int = field(default=6, metadata=_help("random words per canary answer"))
    canary_site: int = field(default=0, metadata=_help("the site that inserts the canaries"))
    canary_seed: int = field(default=1, metadata=_help("seed of canaries and secrets"))
    secrets: int = field(
        default=0, metadata=_help("secret-sharer secrets at the auditing site (0: none)")
    )
    secret_repeats: int = field(default=8, metadata=_help("copies of each secret inserted"))
    secret_alternatives: int = field(
        default=2000, metadata=_help("random alternatives each secret is ranked against")
    )
    canary_clients: int = field(
        default=0,
        metadata=_help("user-level canary clients at the server, each in w.p. 1/2 (0 or >= 20)"),
    )

    def __post_init__(self) -> None:
        _require(
            self.canaries == 0 or self.canaries >= 1000,
            "audit.canaries",
            self.canaries,
            "must be 0 or at least 1000 (fewer cannot bound epsilon usefully)",
        )
        _require(
            self.gradient_canaries == 0 or self.gradient_canaries >= 1000,
            "audit.gradient-canaries",
            self.gradient_canaries,
            "must be 0 or at least 1000",
        )
        _require(self.canary_length >= 1, "audit.canary-length", self.canary_length, ">= 1")
        _require(self.canary_site >= 0, "audit.canary-site", self.canary_site, ">= 0")
        _require(self.secrets >= 0, "audit.secrets", self.secrets, ">= 0")
        _require(self.secret_repeats >= 1, "audit.secret-repeats", self.secret_repeats, ">= 1")
        _require(
            self.secret_alternatives >= 100,
            "audit.secret-alternatives",
            self.secret_alternatives,
            "must be >= 100",
        )
        _require(
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


@dataclass
class HEConfig:
    """Homomorphic aggregation (TenSEAL CKKS), used when strategy.secure-aggregation = "he".

    The parameters are the key ceremony's (`fedllm keys he-init` reads them); every party
    checks its context against them at start.
    """

    poly_modulus_degree: int = field(default=8192, metadata=_help("CKKS ring degree N"))
    coeff_mod_bit_sizes: str = field(
        default="60,60",
        metadata=_help("bits per prime of the coefficient modulus; additions need only two"),
    )
    scale_bits: int = field(default=50, metadata=_help("CKKS scale 2^s: fractional precision"))
    public_context: str = field(
        default="keys/he/public.context",
        metadata=_help("the coordinator's context: public key only, it cannot decrypt"),
    )
    site_context: str = field(
        default="keys/he/secret.context",
        metadata=_help("a site's secret context (a node config `he-context` overrides it)"),
    )
    on_dropout: str = field(
        default="account",
        metadata=_help(
            "distributed DP when sites drop: account the noise actually present, or abort "
            "the round",
            HE_DROPOUT,
        ),
    )

    def __post_init__(self) -> None:
        for key, why in problems(self.params):
            value = {
                "he.poly-modulus-degree": self.poly_modulus_degree,
                "he.coeff-mod-bit-sizes": self.coeff_mod_bit_sizes,
                "he.scale-bits": self.scale_bits,
            }[key]
            _require(False, key, value, why)

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
        metadata=_help(
            "every site signs its update (Ed25519 over run, round, node and payload hash); "
            "the coordinator refuses unsigned, tampered or replayed ones"
        ),
    )
    registry: str = field(
        default="keys/pki/registry.json",
        metadata=_help("the coordinator's registry of site signing keys (`fedllm pki init`)"),
    )
    site_signing_key: str = field(
        default="keys/pki/sites/site-{partition}/signing.key",
        metadata=_help(
            "a site's Ed25519 key ({partition} = its partition-id); a node config "
            "`signing-key` overrides it"
        ),
    )
    at_rest_key: str = field(
        default="",
        metadata=_help(
            "a 32-byte key file (`fedllm keys at-rest-init`): checkpoints and ledgers are "
            "written AES-256-GCM encrypted under it; empty: plaintext"
        ),
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
        metadata=_help(
            "screen the global model every k rounds and at the last round (0: off); the base "
            "model is screened first, as round 0, for reference"
        ),
    )
    filter: str = field(
        default="lexicon",
        metadata=_help("safety filter: lexicon, embedding[:DIR], hf:ID, guard:ID, judge:MODEL"),
    )
    probes: str = field(
        default="bundled:probes",
        metadata=_help("probe prompts: bundled:NAME or a CSV/JSONL file (label 1 = harmful)"),
    )
    max_probes: int = field(
        default=64, metadata=_help("probes asked per screening, stratified by label (0: all)")
    )
    max_new_tokens: int = field(
        default=64, metadata=_help("length bound of each answer (greedy decoding)")
    )
    gate_max_rise: float = field(
        default=10.0,
        metadata=_help(
            "percentage points the harmful-compliance rate may rise above the base model's "
            "before the gate trips"
        ),
    )
    gate_action: str = field(
        default="rollback",
        metadata=_help(
            "a tripped gate: rollback (keep the previous global adapter), stop the run (after "
            "rolling back), or record only",
            GATE_ACTIONS,
        ),
    )
    screen_site_data: bool = field(
        default=False,
        metadata=_help(
            "each site drops the training examples the filter flags before training; only "
            "their count leaves the site"
        ),
    )
    site_data_threshold: float = field(
        default=0.0,
        metadata=_help("harm score at which a site drops an example (0: the filter's own)"),
    )

    def __post_init__(self) -> None:
        _require(self.screen_every >= 0, "safety.screen-every", self.screen_every, ">= 0")
        _require(bool(self.filter.strip()), "safety.filter", self.filter, "names no filter")
        _require(bool(self.probes.strip()), "safety.probes", self.probes, "names no probe set")
        _require(
            self.max_probes == 0 or self.max_probes >= 2,
            "safety.max-probes",
            self.max_probes,
            "must be 0 (all) or at least 2 (one harmful, one benign)",
        )
        _require(self.max_new_tokens >= 1, "safety.max-new-tokens", self.max_new_tokens, ">= 1")
        _require(
            0 <= self.gate_max_rise <= 100,
            "safety.gate-max-rise",
            self.gate_max_rise,
            "must be in [0, 100] percentage points",
        )
        _require(
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


@dataclass
class FedllmConfig:
    """Every setting of a run; `parse_config` is the only way in from flat keys."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    he: HEConfig = field(default_factory=HEConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """The flat dotted form Flower uses (`privacy.noise-multiplier`)."""
        return flatten(self.to_dict())


def flatten(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`{"privacy": {"noise_multiplier": 1}}` -> `{"privacy.noise-multiplier": 1}`."""
    return {
        f"{section}.{name.replace('_', '-')}": value
        for section, values in nested.items()
        for name, value in values.items()
    }


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r} is invalid: {why}.")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(FedllmConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FedllmConfig)}


def known_keys() -> dict[str, tuple[type, dataclasses.Field[Any]]]:
    """Every accepted flat key, with its type and field (for help texts and checks)."""
    keys: dict[str, tuple[type, dataclasses.Field[Any]]] = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name.replace('_', '-')}"] = (hints[f.name], f)
    return keys


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check a value against the field type; ints are accepted where floats are expected."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}' = {value!r} must be a finite number.")
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"config key '{key}' = {value!r} has the wrong type: expected {typ.__name__}, "
        f"got {type(value).__name__}."
    )


def parse_config(flat: Mapping[str, Any]) -> FedllmConfig:
    """Build a validated `FedllmConfig` from Flower's flat run config.

    Parameters
    ----------
    flat : Mapping[str, Any]
        Dotted keys (``lora.rank``) to scalar values, as in ``context.run_config``.

    Returns
    -------
    FedllmConfig
        Defaults overridden by `flat`.

    Raises
    ------
    ConfigError
        On an unknown key (with the closest known key), a wrong type, a value out of range,
        or a value outside its listed choices.
    """
    keys = known_keys()
    per_section: dict[str, dict[str, Any]] = {s: {} for s in _sections()}
    for key, value in flat.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see `fedllm config keys`."
            raise ConfigError(f"unknown config key '{key}'{hint}")
        typ, f = keys[key]
        coerced = _coerce(key, value, typ)
        choices = f.metadata.get("choices")
        if choices and coerced not in choices:
            raise ConfigError(
                f"config key '{key}' = {coerced!r} is not one of: {', '.join(choices)}."
            )
        section = key.split(".", 1)[0]
        per_section[section][f.name] = coerced
    built = {name: cls(**per_section[name]) for name, cls in _sections().items()}
    cfg = FedllmConfig(**built)
    _check_cross_section(cfg)
    return cfg


def _check_cross_section(cfg: FedllmConfig) -> None:
    if cfg.model.quantization != "none" and cfg.train.device == "cpu":
        raise ConfigError(
            f"config key 'model.quantization' = {cfg.model.quantization!r} needs CUDA "
            "(bitsandbytes); set it to 'none' or 'train.device' to 'auto'/'cuda'."
        )
    if cfg.audit.canary_clients and cfg.privacy.mode == "record":
        raise ConfigError(
            "config key 'audit.canary-clients' audits user-level DP: set privacy.mode to "
            "'user' or 'record+user' (or 'none' for a non-DP baseline)."
        )
    if cfg.strategy.secure_aggregation == "he":
        _check_he(cfg)
    if cfg.strategy.name == "fedprox" and cfg.strategy.proximal_mu == 0:
        raise ConfigError("config key 'strategy.proximal-mu' = 0.0 makes FedProx plain FedAvg.")


def _check_he(cfg: FedllmConfig) -> None:
    """What homomorphic aggregation cannot do: the server never sees a plaintext update."""
    why = None
    if cfg.strategy.name != "fedavg":
        why = (
            f"'strategy.name' = {cfg.strategy.name!r} needs the aggregate in plaintext at the "
            "server; use 'fedavg'"
        )
    elif not cfg.lora.ffa:
        why = (
            "'lora.ffa' = false: averaging LoRA's A and B separately is not the average of "
            "B·A; HE aggregation needs FFA-LoRA (A frozen, only B sent) to be exact"
        )
    elif cfg.safety.screens:
        why = (
            f"'safety.screen-every' = {cfg.safety.screen_every} screens the global model at the "
            "coordinator, which under HE holds only ciphertexts; set it to 0 (site-data "
            "screening, 'safety.screen-site-data', still works)"
        )
    elif cfg.audit.canary_clients or cfg.audit.at_site:
        why = "audit.* canaries need the final adapter in plaintext at the auditor"
    elif cfg.privacy.user_level and cfg.privacy.user_clipping != "fixed":
        why = (
            "'privacy.user-clipping' = 'adaptive' needs a server-side count of clipped "
            "updates; under HE each site clips to a fixed 'privacy.user-clip'"
        )
    elif cfg.privacy.user_level and cfg.strategy.fraction_train != 1.0:
        why = (
            "distributed DP under HE needs every site every round (each adds 1/n of the "
            "noise); set 'strategy.fraction-train' = 1.0"
        )
    if why:
        raise ConfigError(f"strategy.secure-aggregation = 'he': {why}.")


def config_hash(cfg: FedllmConfig) -> str:
    """SHA-256 of the resolved config, so a report can prove which settings a run used."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
