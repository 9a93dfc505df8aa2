"""What a site accepts, stated in its own TOML file and checked before it acts on a request.

The coordinator is the party a site must not have to trust, so what protects a site's data
cannot come from the run config the coordinator sends. A site names its policy file in its
node config (`policy = "/etc/site/policy.toml"`); every request is checked against it
before any of the site's data is read, and a request that would lower the site's protection
is refused (with the rule named), never downgraded:

```toml
privacy-modes = ["record"]        # the privacy.mode values the site trains under
min-noise-multiplier = 0.8        # the smallest DP-SGD sigma it accepts
max-delta = 1e-5                  # the largest delta it accepts (0 = the run's default)
epsilon-max = 4.0                 # its own cap on epsilon (the node config's epsilon-max too)
base-models = ["embedded:smollm2-135m-instruct"]  # the base models it fine-tunes (any if empty)
answer-evaluate = true            # whether it evaluates the coordinator's adapters at all
max-evaluations-per-round = 1     # evaluation requests it answers per round of a run (0: any)
max-evaluations-per-run = 20      # ... per run
max-evaluations = 200             # ... over every run (what a coordinator renaming runs meets)
```

The run's terms (base model, privacy mode, σ, δ, the cap without DP) are checked on every
request, evaluation included: a site answers nothing for a run it would not train in.
Held-out evaluation answers a loss on private data for any adapter the coordinator sends,
released without DP; the `max-evaluations*` caps bound how many such answers it gives. They
are counted at the site (`fedllm.site_meter`, under its `state-dir`), durably, before the
answer is computed. The round and the run name come from the coordinator, so a hostile one
can open fresh rounds and runs: only `max-evaluations` bounds the total.

A site with an ε cap (here or in the node config's `epsilon-max`) trains only under
record-level DP: a run without DP-SGD spends an unbounded ε that no cap could hold.
`base-models` matches names only. That a model under an allowed name is the model the run
means is checked beside this policy, by the same mod (`fedllm.mods.policy.PolicyMod`),
with `fedllm.site_model.model_refusal`: a run that sets `model.fingerprint` is refused
where the site's model (its own copy, node config `model`, or the one `model.name` resolves
to at the site) has another, and a site with its own copy trains only under a run that
sets one. What this policy does not check before the request: ε calibrated from
`privacy.target-epsilon`, whose σ is checked at training time, once the site's record count
is known (`fedllm.site.run_train`).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedllm.config import FedllmConfig
from fedllm.errors import ConfigError, PolicyRefusedError
from fedllm.privacy.config import PRIVACY_MODES

__all__ = ["SitePolicy", "load_policy"]


@dataclass(frozen=True)
class SitePolicy:
    """A site's rules (see the module docstring); the defaults accept what fedllm can run."""

    privacy_modes: tuple[str, ...] = PRIVACY_MODES
    min_noise_multiplier: float = 0.0
    max_delta: float = 0.0  # 0: no bound beyond the run's own
    epsilon_max: float = 0.0  # 0: no cap of the policy's own
    base_models: tuple[str, ...] = ()  # empty: any
    answer_evaluate: bool = True
    max_evaluations_per_round: int = 0  # 0: no cap
    max_evaluations_per_run: int = 0
    max_evaluations: int = 0
    source: str = ""  # the file it was read from, for messages

    def cap(self, node_epsilon_max: float | None) -> float | None:
        """The site's own ε cap: the lower of the policy's and the node config's."""
        caps = [c for c in (self.epsilon_max, node_epsilon_max or 0.0) if c > 0]
        return min(caps) if caps else None

    @property
    def meters_evaluation(self) -> bool:
        """Whether it caps how many evaluation requests it answers."""
        return any(
            (self.max_evaluations_per_round, self.max_evaluations_per_run, self.max_evaluations)
        )

    def refusal(self, cfg: FedllmConfig, phase: str, *, node_epsilon_max: float | None) -> str:
        """Why this site refuses a `phase` ("train" or "evaluate") request under `cfg`, or
        "" when the policy accepts it. Checks only what the request states: no data read.
        The run's terms hold for every phase: a site evaluates nothing for a run it would
        not train in."""
        where = f"site policy {self.source}" if self.source else "site policy"
        if phase == "evaluate" and not self.answer_evaluate:
            return f"{where}: answer-evaluate = false (this site evaluates no adapter)"
        if self.base_models and cfg.model.name not in self.base_models:
            return (
                f"{where}: base-models = {list(self.base_models)} does not include the "
                f"requested model.name = {cfg.model.name!r}"
            )
        p = cfg.privacy
        if p.mode not in self.privacy_modes:
            return (
                f"{where}: privacy-modes = {list(self.privacy_modes)} does not include the "
                f"requested privacy.mode = {p.mode!r}"
            )
        cap = self.cap(node_epsilon_max)
        if cap is not None and not p.record_level:
            return (
                f"{where}: this site caps epsilon at {cap:g}, and privacy.mode = {p.mode!r} "
                "trains without DP-SGD (no epsilon to hold under the cap)"
            )
        if p.record_level and p.target_epsilon <= 0:
            if p.noise_multiplier < self.min_noise_multiplier:
                return (
                    f"{where}: min-noise-multiplier = {self.min_noise_multiplier:g}, but the "
                    f"request asks for privacy.noise-multiplier = {p.noise_multiplier:g}"
                )
        if p.record_level and self.max_delta > 0 and p.delta > self.max_delta:
            return (
                f"{where}: max-delta = {self.max_delta:g}, but the request asks for "
                f"privacy.delta = {p.delta:g}"
            )
        return ""

    def check_dp(self, noise_multiplier: float, delta: float, *, site: int) -> None:
        """The σ and δ a site's DP-SGD will run at, once known (calibrated from a target ε,
        or δ from the record count), checked before training.

        Raises
        ------
        PolicyRefusedError
            Naming the rule, if either lowers protection below the policy.
        """
        where = f"site {site}: site policy {self.source}".rstrip()
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusedError(
                f"{where}: min-noise-multiplier = {self.min_noise_multiplier:g}, but this round "
                f"would run DP-SGD at sigma {noise_multiplier:.4g}; it refuses to train"
            )
        if self.max_delta > 0 and delta > self.max_delta:
            raise PolicyRefusedError(
                f"{where}: max-delta = {self.max_delta:g}, but this round would be accounted "
                f"at delta {delta:.3g}; it refuses to train"
            )


_TYPES: dict[str, type] = {
    "privacy_modes": tuple,
    "min_noise_multiplier": float,
    "max_delta": float,
    "epsilon_max": float,
    "base_models": tuple,
    "answer_evaluate": bool,
    "max_evaluations_per_round": int,
    "max_evaluations_per_run": int,
    "max_evaluations": int,
}


def _value(path: Path, key: str, value: Any, typ: type) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(
            f"site policy {path}: key '{key}' = {value!r} has the wrong type; expected {expected}."
        )

    if typ is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("a whole number")
        if value < 0:
            raise ConfigError(f"site policy {path}: key '{key}' = {value!r} must be >= 0.")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"site policy {path}: key '{key}' = {value!r} must be >= 0.")
        return float(value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong("a list of strings")
    return tuple(value)


def load_policy(path: str | Path) -> SitePolicy:
    """Read a site's policy file, refusing an unreadable file, an unknown key, a wrong type
    or an unknown privacy mode in one line that names the file and the key."""
    path = Path(path).expanduser()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(
            f"site policy {path} cannot be read ({e.strerror or e}); fix the node config's "
            "'policy'."
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"site policy {path} is not valid TOML: {e}.") from e
    known = {f.name.replace("_", "-"): f.name for f in fields(SitePolicy) if f.name != "source"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"site policy {path}: unknown key '{key}'; known keys: {', '.join(known)}."
            )
        values[known[key]] = _value(path, key, value, _TYPES[known[key]])
    unknown = set(values.get("privacy_modes", ())) - set(PRIVACY_MODES)
    if unknown:
        raise ConfigError(
            f"site policy {path}: privacy-modes names {sorted(unknown)}; known modes: "
            f"{', '.join(PRIVACY_MODES)}."
        )
    if values.get("max_delta", 0.0) >= 1:
        raise ConfigError(f"site policy {path}: max-delta must be below 1.")
    return SitePolicy(**values, source=str(path))
