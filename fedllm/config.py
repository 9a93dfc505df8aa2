"""The run configuration: one validated, typed object built from Flower's flat run config.

Flower hands an app a flat mapping of dotted keys (``privacy.noise-multiplier = 0.8``). This
module turns it into nested dataclasses (``cfg.privacy.noise_multiplier``), refusing unknown
keys, wrong types and out-of-range values with one sentence that quotes the key and the value.

The sections of a feature live beside it and are re-exported here: `privacy` in
`fedllm.privacy.config`, `audit` in `fedllm.privacy.audit.config`, `he` and `security` in
`fedllm.secure.config`, `safety` in `fedllm.safety.config`. The run-wide sections (run, model,
lora, data, train, strategy, eval), the cross-section checks, coercion and the config hash stay
here.
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

from fedllm.config_fields import field_help, require
from fedllm.errors import ConfigError
from fedllm.privacy.audit.config import AuditConfig
from fedllm.privacy.config import PrivacyConfig
from fedllm.quantize import ENCODINGS as UPDATE_ENCODINGS
from fedllm.safety.config import SafetyConfig
from fedllm.secure.config import HEConfig, SecurityConfig
from fedllm.strategy.config import ValidateConfig
from fedllm.strategy.flower import ROBUST_STRATEGIES
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
    "ValidateConfig",
    "SecurityConfig",
    "StrategyConfig",
    "TrainConfig",
    "config_hash",
    "stable_dict",
    "flatten",
    "parse_config",
]

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "chatterbot"

STRATEGIES = tuple(FLOWER_STRATEGIES)  # the one list: fedllm.strategy.flower
PARTITIONERS = ("by-category", "iid", "dirichlet")
# How a site's records are split into train and held-out: by each record's own hash (a
# record's side never depends on the others), or the seeded permutation of the whole set
# that runs made before `data.split` existed used (they resume only under it).
SPLITS = ("hash", "permutation")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "sgd")
SECURE_AGGREGATION = ("none", "he")
NAME_MAX = 255  # the longest directory name ext4 and XFS take, in bytes


@dataclass
class RunConfig:
    """What the run is called, where it lives and how long it lasts."""

    name: str = field(
        default="",
        metadata=field_help("run directory under output-dir; empty: a new timestamped run"),
    )
    output_dir: str = field(default="outputs", metadata=field_help("parent of run directories"))
    rounds: int = field(default=3, metadata=field_help("number of federated rounds"))
    seed: int = field(
        default=0, metadata=field_help("seed shared by all sites (LoRA init, splits)")
    )
    min_sites: int = field(
        default=2, metadata=field_help("fewest sites that must train in a round")
    )
    timeout: float = field(
        default=3600.0, metadata=field_help("seconds to wait for replies a round")
    )

    def __post_init__(self) -> None:
        require(self.rounds >= 1, "run.rounds", self.rounds, "must be at least 1")
        require(self.min_sites >= 1, "run.min-sites", self.min_sites, "must be at least 1")
        require(self.timeout > 0, "run.timeout", self.timeout, "must be positive")
        require(
            "/" not in self.name and "\x00" not in self.name and self.name not in (".", ".."),
            "run.name",
            self.name,
            "must be a plain directory name",
        )
        require(
            len(self.name.encode("utf-8", "surrogatepass")) <= NAME_MAX,
            "run.name",
            self.name,
            f"must be at most {NAME_MAX} bytes (a directory name's limit)",
        )


@dataclass
class ModelConfig:
    """The base causal LM every site loads locally (it never travels)."""

    name: str = field(
        default=EMBEDDED_MODEL,
        metadata=field_help("hub id, local directory, or the embedded default"),
    )
    gguf_file: str = field(default="", metadata=field_help("GGUF file inside `name`, if any"))
    dtype: str = field(
        default="auto", metadata=field_help("auto: bf16 on CUDA, fp32 on CPU", DTYPES)
    )
    quantization: str = field(
        default="none",
        metadata=field_help("4bit/8bit base weights (QLoRA, CUDA only)", QUANTIZATIONS),
    )
    trust_remote_code: bool = field(default=False, metadata=field_help("allow hub model code"))
    fingerprint: str = field(
        default="",
        metadata=field_help(
            "SHA-256 the base model must have (`fedllm model fingerprint`); sites refuse "
            "another, and a site with its own copy (node config `model`) trains only when set"
        ),
    )

    def __post_init__(self) -> None:
        require(
            not self.fingerprint or _is_sha256(self.fingerprint),
            "model.fingerprint",
            self.fingerprint,
            "must be empty or 64 lowercase hex digits, as `fedllm model fingerprint` prints",
        )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass
class LoraConfig:
    """The LoRA adapter: the only tensors that leave a site."""

    rank: int = field(default=8, metadata=field_help("LoRA rank r"))
    alpha: float = field(default=16.0, metadata=field_help("LoRA scaling alpha"))
    dropout: float = field(default=0.0, metadata=field_help("dropout on the LoRA input"))
    target_modules: str = field(
        default="q_proj,v_proj", metadata=field_help("comma-separated module names to adapt")
    )
    ffa: bool = field(
        default=True,
        metadata=field_help("FFA-LoRA: A frozen from the shared seed, only B trained and sent"),
    )

    def __post_init__(self) -> None:
        require(self.rank >= 1, "lora.rank", self.rank, "must be at least 1")
        require(self.alpha > 0, "lora.alpha", self.alpha, "must be positive")
        require(0 <= self.dropout < 1, "lora.dropout", self.dropout, "must be in [0, 1)")
        require(bool(self.modules), "lora.target-modules", self.target_modules, "names no module")

    @property
    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]


@dataclass
class DataConfig:
    """Where each site's private examples come from and how they are split."""

    source: str = field(
        default=EMBEDDED_DATA,
        metadata=field_help(
            "chatterbot, a local .jsonl/.csv file or saved dir, a folder of one file per site, "
            "or a hub dataset id"
        ),
    )
    partitioner: str = field(
        default="by-category",
        metadata=field_help("how examples are split into sites", PARTITIONERS),
    )
    dirichlet_alpha: float = field(default=0.5, metadata=field_help("concentration for dirichlet"))
    prompt_field: str = field(default="prompt", metadata=field_help("column holding the prompt"))
    response_field: str = field(
        default="response", metadata=field_help("column holding the answer")
    )
    category_field: str = field(default="category", metadata=field_help("column holding the topic"))
    eval_fraction: float = field(default=0.1, metadata=field_help("held-out share of each site"))
    split: str = field(
        default="hash",
        metadata=field_help(
            "train/held-out split: each record by its own hash, or the size-dependent "
            "permutation runs made before this key used",
            SPLITS,
        ),
    )
    max_length: int = field(default=128, metadata=field_help("token limit per example"))

    def __post_init__(self) -> None:
        require(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "> 0")
        require(0 < self.eval_fraction < 1, "data.eval-fraction", self.eval_fraction, "in (0, 1)")
        require(self.split in SPLITS, "data.split", self.split, f"one of {', '.join(SPLITS)}")
        require(self.max_length >= 8, "data.max-length", self.max_length, "must be >= 8")


@dataclass
class TrainConfig:
    """The local optimisation each site runs per round."""

    local_steps: int = field(default=2, metadata=field_help("optimizer steps per round per site"))
    batch_size: int = field(
        default=32, metadata=field_help("expected logical batch (Poisson rate = batch / examples)")
    )
    physical_batch_size: int = field(default=8, metadata=field_help("micro-batch held in memory"))
    learning_rate: float = field(default=3e-3, metadata=field_help("local learning rate"))
    optimizer: str = field(default="adamw", metadata=field_help("local optimizer", OPTIMIZERS))
    weight_decay: float = field(default=0.0, metadata=field_help("AdamW weight decay"))
    device: str = field(default="auto", metadata=field_help("auto: CUDA when present", DEVICES))

    def __post_init__(self) -> None:
        require(self.local_steps >= 1, "train.local-steps", self.local_steps, "must be >= 1")
        require(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        require(
            self.physical_batch_size >= 1,
            "train.physical-batch-size",
            self.physical_batch_size,
            "must be >= 1",
        )
        require(self.learning_rate > 0, "train.learning-rate", self.learning_rate, "> 0")
        require(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, ">= 0")


@dataclass
class StrategyConfig:
    """How the server combines adapter updates (Flower's strategies)."""

    name: str = field(default="fedavg", metadata=field_help("aggregation strategy", STRATEGIES))
    fraction_train: float = field(default=1.0, metadata=field_help("share of sites asked to train"))
    streaming: bool = field(
        default=True,
        metadata=field_help(
            "fold each reply into the aggregate as it arrives (FedAvg family, user-level DP); "
            "false: collect the round's replies first"
        ),
    )
    server_learning_rate: float = field(
        default=0.1, metadata=field_help("eta for FedAdam/Yogi/...")
    )
    server_momentum: float = field(default=0.9, metadata=field_help("momentum for FedAvgM"))
    proximal_mu: float = field(default=0.01, metadata=field_help("FedProx proximal term weight"))
    tau: float = field(default=1e-3, metadata=field_help("adaptivity for FedAdam/Yogi/Adagrad"))
    secure_aggregation: str = field(
        default="none",
        metadata=field_help(
            "he: sites send CKKS ciphertexts and the server sums what it cannot read",
            SECURE_AGGREGATION,
        ),
    )
    norm_bound: float = field(
        default=0.0,
        metadata=field_help(
            "clip each site's update (its adapter minus the global one) to this L2 norm before "
            "any rule aggregates it; 0: off"
        ),
    )
    trim_beta: float = field(
        default=0.2,
        metadata=field_help("FedTrimmedAvg: share of updates cut at each end, per coordinate"),
    )
    tolerated_sites: int = field(
        default=1,
        metadata=field_help("Krum, MultiKrum, Bulyan: hostile sites a round must tolerate"),
    )
    krum_select: int = field(
        default=0,
        metadata=field_help(
            "MultiKrum: updates averaged; 0: the sites sampled minus strategy.tolerated-sites"
        ),
    )
    update_encoding: str = field(
        default="fp32",
        metadata=field_help(
            "how a site's update travels: fp32 as trained, fp16, or int8 codes with a "
            "float32 absmax per block (post-processing after every privacy mechanism)",
            UPDATE_ENCODINGS,
        ),
    )
    quantization_block: int = field(
        default=64, metadata=field_help("int8: values per block sharing one absmax scale")
    )

    def __post_init__(self) -> None:
        require(self.norm_bound >= 0, "strategy.norm-bound", self.norm_bound, "must be >= 0")
        require(
            0 <= self.trim_beta < 0.5, "strategy.trim-beta", self.trim_beta, "must be in [0, 0.5)"
        )
        require(
            self.tolerated_sites >= 0,
            "strategy.tolerated-sites",
            self.tolerated_sites,
            "must be >= 0",
        )
        require(self.krum_select >= 0, "strategy.krum-select", self.krum_select, "must be >= 0")
        require(
            self.quantization_block >= 8,
            "strategy.quantization-block",
            self.quantization_block,
            "must be >= 8 (a float32 scale per block of fewer values saves little or nothing)",
        )
        require(
            0 < self.fraction_train <= 1,
            "strategy.fraction-train",
            self.fraction_train,
            "must be in (0, 1]",
        )
        require(
            self.server_learning_rate > 0,
            "strategy.server-learning-rate",
            self.server_learning_rate,
            "must be > 0",
        )
        require(self.proximal_mu >= 0, "strategy.proximal-mu", self.proximal_mu, ">= 0")
        require(
            0 <= self.server_momentum < 1,
            "strategy.server-momentum",
            self.server_momentum,
            "must be in [0, 1)",
        )
        require(self.tau > 0, "strategy.tau", self.tau, "must be > 0")


@dataclass
class EvalConfig:
    """Federated evaluation of the global adapter on each site's held-out split."""

    max_examples: int = field(default=16, metadata=field_help("held-out examples per site"))
    batch_size: int = field(default=8, metadata=field_help("evaluation batch size"))
    sites: int = field(
        default=0,
        metadata=field_help(
            "sites that evaluate each round (and round 0): a fixed cohort drawn with run.seed; "
            "0: every site"
        ),
    )

    def __post_init__(self) -> None:
        require(self.max_examples >= 1, "eval.max-examples", self.max_examples, ">= 1")
        require(self.batch_size >= 1, "eval.batch-size", self.batch_size, ">= 1")
        require(self.sites >= 0, "eval.sites", self.sites, ">= 0 (0: every site)")


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
    validate: ValidateConfig = field(default_factory=ValidateConfig)

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
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # Flower's run config carries signed 64-bit integers (sint64): a larger one cannot reach
        # the sites, and past 4300 digits is not even printable (Python's int-to-text limit)
        raise ConfigError(
            f"config key '{key}' = an integer of {value.bit_length()} bits is out of range: "
            "the run config carries signed 64-bit integers."
        )
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
            raise ConfigError(f"unknown config key {key!r}{hint}")  # !r: one line, whatever it is
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
    if cfg.strategy.name == "fedtrimmedavg" and cfg.strategy.trim_beta == 0:
        raise ConfigError(
            "config key 'strategy.trim-beta' = 0.0 makes FedTrimmedAvg plain (unweighted) "
            "averaging: it trims nothing."
        )
    _check_robust_with_user_dp(cfg)


def _check_robust_with_user_dp(cfg: FedllmConfig) -> None:
    """What user-level DP-FedAvg accounts is one Gaussian noise draw on the sum of clipped
    updates (sensitivity: the clip norm). A robust rule over the sites' individual updates
    is a different mechanism whose sensitivity nobody has accounted, so it is refused; a
    norm bound is a second clip before the noise (sensitivity at most the clip norm, still
    what is accounted), so it is allowed."""
    name = cfg.strategy.name
    if name not in ROBUST_STRATEGIES:
        return
    if cfg.privacy.user_level or cfg.audit.canary_clients:
        why = "privacy.mode includes 'user'" if cfg.privacy.user_level else "audit.canary-clients"
        raise ConfigError(
            f"'strategy.name' = {name!r} with {why}: user-level DP releases one noisy sum of "
            f"clipped updates, and a {name} over each site's update is not the mechanism its "
            "accountant assumes; use 'strategy.norm-bound' (a clip before the noise) with "
            "'fedavg', or record-level DP (under which every rule is post-processing)."
        )


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
    elif cfg.strategy.update_encoding != "fp32":
        why = (
            f"'strategy.update-encoding' = {cfg.strategy.update_encoding!r} quantises plaintext "
            "updates, and under HE a site sends CKKS ciphertexts, which are not quantised (a "
            "ciphertext is not a tensor of values, and CKKS already encodes reals "
            "approximately at he.scale-bits); set it to 'fp32'"
        )
    elif cfg.strategy.norm_bound:
        why = (
            f"'strategy.norm-bound' = {cfg.strategy.norm_bound:g} clips each site's update at "
            "the coordinator, which under HE sees only the encrypted sum; set it to 0 (with "
            "user-level DP each site clips its own update to 'privacy.user-clip')"
        )
    elif cfg.eval.sites and not cfg.privacy.user_level:
        why = (
            f"'eval.sites' = {cfg.eval.sites}: under HE a site's weight must be public before "
            "round 1, and its round-0 evaluation is what fixes it; set it to 0 (every site)"
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


# Sections and keys added after runs were made, with the value older runs behaved as: left
# out of the hash and the resume key while they hold it, so those runs keep both.
LATE_SECTIONS = {"safety": SafetyConfig, "validate": ValidateConfig}
LATE_KEYS = {
    ("he", "noise_assumption"): "curious-site",
    ("model", "fingerprint"): "",
    ("data", "split"): "permutation",  # older runs split so; new ones default to "hash"
    ("security", "coordinator_key"): "keys/pki/superlink/coordinator.key",
    ("security", "coordinator_public_key"): "keys/pki/coordinator.pub",
    ("strategy", "norm_bound"): 0.0,
    ("strategy", "trim_beta"): 0.2,
    ("strategy", "tolerated_sites"): 1,
    ("strategy", "krum_select"): 0,
    ("strategy", "update_encoding"): "fp32",
    ("strategy", "quantization_block"): 64,
    ("strategy", "streaming"): True,  # how replies are received, not what is computed
    ("eval", "sites"): 0,
}


def stable_dict(cfg: FedllmConfig, *, late_sections: tuple[str, ...] = ("validate",)) -> dict:
    """`cfg.to_dict()` without the `late_sections` and `LATE_KEYS` that hold their defaults."""
    d = cfg.to_dict()
    for name in late_sections:
        if d[name] == dataclasses.asdict(LATE_SECTIONS[name]()):
            del d[name]
    for (section, key), default in LATE_KEYS.items():
        if d[section].get(key) == default:
            del d[section][key]
    return d


def config_hash(cfg: FedllmConfig) -> str:
    """SHA-256 of the resolved config, so a report can prove which settings a run used. A
    section added after runs were made is left out while it holds its defaults, so those
    runs keep their hash."""
    blob = json.dumps(stable_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
