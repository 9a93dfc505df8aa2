"""User-level (client-level) DP-FedAvg: clip each site's whole update, noise the sum (pure maths).

This is DP-FedAvg with the fixed-denominator estimator (McMahan et al. 2018, arXiv 1710.06963)
and optional adaptive clipping (Andrew et al. 2021, arXiv 1905.03871). Each round every site
is sampled independently with probability q (Poisson sampling of sites), each sampled site's
update Δ_i = local − global is clipped to L2 norm S, and

    noisy mean = (Σ clip(Δ_i) + N(0, z_Δ² S² I)) / (q · N)

Dividing by the *expected* number of sites q·N, not by how many replied, is what keeps the
sensitivity at S / (q·N) whatever happens: a site that drops out, refuses or is rejected only
shrinks the sum, never the noise, so nothing is over-claimed. Each site counts once (equal
weights): weighting by example counts would let one big site's update move the mean by more
than S / (q·N).

Why not Flower's `DifferentialPrivacy*Clipping` wrappers as they are: they divide by the
number of replies (the inner strategy's weighted mean) while adding noise scaled to a fixed
`num_sampled_clients`, they sample a fixed number of nodes (the Poisson-sampled Gaussian
accountants do not cover that), and they draw noise from numpy's global, seedable RNG. Their
adaptive wrapper (1.41) also noises the raw count of clipped updates, whose sensitivity is 1
when a site is added or removed, while splitting the noise as if the bits were centred
(sensitivity 1/2): the multiplier it states is then too large (at z = 1, σ_b = 0.6 the
truth is 0.57). Here the bits are centred, as in Andrew et al. and TF-Privacy's quantile
estimator, so the split is exact. Flower's helpers (`flwr.supercore.differential_privacy`:
`compute_adaptive_noise_params`, the noise split between the update and the count, and
`clip_inputs_inplace`/`get_norm`) are rewritten here as `adaptive_update_noise`,
`clip_update` and `l2_norm`, number for number: only the apps, `fedllm/strategy/`,
`fedllm/mods/` and `fedllm/wire.py` may import Flower, and this module is pure maths.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.errors import ConfigError

__all__ = [
    "WITHHELD",
    "UserDPRound",
    "UserDPSettings",
    "adaptive_update_noise",
    "clip_update",
    "l2_norm",
    "next_clip_norm",
    "noisy_mean_update",
    "noisy_unclipped_fraction",
    "poisson_sample",
    "secure_rng",
    "update_clip_norm",
]

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]

# What the coordinator knows each round and does not release: the sites' update norms, the
# exact number of clipped updates, how many sites were sampled and how many contributed.
# None of it is protected by the mechanism (one site added or removed changes each), so none
# of it goes into state.json, summary.json, the ledger or the log; with adaptive clipping
# only the noised count (`clipped_noisy`) is recorded. These are the keys of a round's
# record written before they were withheld: a resumed run and the summary drop them.
WITHHELD = ("update_norms", "clipped", "sampled", "contributors")


def secure_rng() -> np.random.Generator:
    """A generator seeded from the OS entropy pool: DP noise must not be reproducible from
    anything in the config (a seeded RNG would let anyone who knows the seed subtract it)."""
    return np.random.default_rng(secrets.randbits(128))


@dataclass(frozen=True)
class UserDPSettings:
    """One run's user-level mechanism, with the noise split adaptive clipping needs.

    `noise_multiplier` is the effective z the accountant sees. With adaptive clipping part of
    the privacy goes to the noisy count of unclipped updates (std `count_stddev`). That count
    is a sum of centred bits b − 1/2 (sensitivity 1/2, see `update_clip_norm`), so its own
    multiplier is 2σ_b and the update gets z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2) > z (Andrew et al.,
    Thm 1): the two queries together are exactly a Gaussian mechanism with multiplier z.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    num_sites: int
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0
    audit_baseline: bool = False

    def __post_init__(self) -> None:
        if self.audit_baseline and self.noise_multiplier == 0 and not self.adaptive:
            return  # a non-DP baseline run for canary audits: clipped mean, no noise, no claim
        if not self.noise_multiplier > 0:
            raise ConfigError(
                f"config key 'privacy.user-noise-multiplier' = {self.noise_multiplier} must be "
                "> 0 for user-level DP; use privacy.mode = 'record' or 'none' instead."
            )
        if self.num_sites < 1:
            raise ConfigError("user-level DP needs at least one connected site.")
        if self.adaptive:
            self.update_noise_multiplier  # noqa: B018 - validates the noise split early

    @property
    def expected_sites(self) -> float:
        """q·N, the fixed denominator of the mean."""
        return self.sample_rate * self.num_sites

    @property
    def count_noise(self) -> float:
        """σ_b: Flower's default is expected sites / 20, as Andrew et al. recommend."""
        if not self.adaptive:
            return 0.0
        return self.count_stddev if self.count_stddev > 0 else self.expected_sites / 20

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ, the multiplier applied to the update sum (equals z with fixed clipping)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return self.noise_multiplier
        if self.noise_multiplier >= 2 * self.count_noise:
            raise ConfigError(
                f"config key 'privacy.user-count-stddev' = {self.count_noise:g} is too small for "
                f"adaptive clipping at privacy.user-noise-multiplier = {self.noise_multiplier}: "
                f"it must exceed z/2 = {self.noise_multiplier / 2:g} (with "
                f"{self.expected_sites:g} expected sites the default is sites/20)."
            )
        return adaptive_update_noise(self.noise_multiplier, self.count_noise)


def adaptive_update_noise(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2): the update's noise multiplier when a count query of
    sensitivity 1/2 (centred bits) with std σ_b shares the budget of an effective multiplier z
    (Andrew et al. 2021, arXiv 1905.03871).

    The same expression, and the same warning, as Flower's `compute_adaptive_noise_params`
    (1.41); needs z < 2σ_b. The expression holds only for centred bits, which Flower's own
    adaptive wrapper does not use (see the module docstring).
    """
    z_delta = (noise_multiplier ** (-2) - (2 * count_stddev) ** (-2)) ** -0.5
    if z_delta / noise_multiplier >= 2:
        log.warning(
            "A significant amount of noise (%s) has to be added. Consider increasing "
            "`clipped_count_stddev` or `num_sampled_clients`.",
            z_delta / noise_multiplier,
        )
    return float(z_delta)


@dataclass(frozen=True)
class UserDPRound:
    """What one round of the mechanism did.

    Released under DP, or public (the run's files may hold them): `mean_update`,
    `clip_norm`, `next_clip_norm`, `update_noise_std` and, with adaptive clipping,
    `noisy_clipped`. Exact, for this process only (never written anywhere, see
    docs/privacy.md): `contributors` and `clipped` are counts over the sampled sites that
    no noise protects, so one site added or removed moves them by 1. The sites' update
    norms are not returned at all.
    """

    mean_update: dict[str, np.ndarray]
    clip_norm: float
    next_clip_norm: float
    contributors: int
    clipped: int
    update_noise_std: float
    # The noisy count of clipped updates the clip norm moved on: q·N · (1 − b̄) with b̄ the
    # noisy unclipped fraction (post-processing of the noised sum of centred bits, and a
    # one-to-one function of `next_clip_norm` / `clip_norm`); None with fixed clipping,
    # which releases no count.
    noisy_clipped: float | None = None


def l2_norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm of all `arrays` flattened together (as Flower's `get_norm` computes it)."""
    return float(np.sqrt(sum([np.linalg.norm(a.flat) ** 2 for a in arrays])))


def clip_update(update: Arrays, clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled down to L2 norm at most `clip_norm` (over all tensors), and its norm.

    Flat clipping (McMahan et al. 2018): every tensor times min(1, S / ‖Δ‖), as Flower's
    `clip_inputs_inplace` does.
    """
    names = list(update)
    values = [np.array(update[n], dtype=np.float64) for n in names]
    norm = l2_norm(values)
    if norm > 0:  # the factor divides by the norm; a zero update needs no clipping
        scale = min(1, clip_norm / norm)
        for value in values:
            value *= scale
    return dict(zip(names, values, strict=True)), norm


def poisson_sample(
    candidates: Sequence[int], sample_rate: float, rng: np.random.Generator
) -> list[int]:
    """Each candidate kept independently with probability `sample_rate` (may keep none)."""
    if sample_rate >= 1.0:
        return list(candidates)
    return [c for c in candidates if rng.random() < sample_rate]


def noisy_unclipped_fraction(
    settings: UserDPSettings, unclipped: int, rng: np.random.Generator, *, contributors: int
) -> float:
    """b̄, the noisy fraction of updates at or below the clip norm (Andrew et al.).

    Each of the `contributors` sites gives a bit b (1 if its update was at or below the norm)
    and the sum of centred bits Σ (b − 1/2) = `unclipped` − `contributors`/2 is noised with
    σ_b: adding or removing one site moves it by 1/2, the sensitivity the noise split of
    `UserDPSettings` assumes (a raw count moves by 1). It is divided by the expected number
    of sites q·N (fixed denominator again) and 1/2 added back, as TF-Privacy's quantile
    estimator does; the expected, not the actual, number of sites is added back, since the
    actual number is itself private. This is the value the mechanism releases.
    """
    centred = unclipped - contributors / 2 + rng.normal(0.0, settings.count_noise)
    return centred / settings.expected_sites + 0.5


def next_clip_norm(settings: UserDPSettings, clip_norm: float, noisy_fraction: float) -> float:
    """Andrew et al.'s geometric step towards the target quantile: C · exp(−η (b̄ − γ))."""
    return clip_norm * math.exp(
        -settings.clip_learning_rate * (noisy_fraction - settings.target_quantile)
    )


def update_clip_norm(
    settings: UserDPSettings,
    clip_norm: float,
    unclipped: int,
    rng: np.random.Generator,
    *,
    contributors: int,
) -> float:
    """The next clip norm from a noisy count: `next_clip_norm` of
    `noisy_unclipped_fraction` (see both)."""
    fraction = noisy_unclipped_fraction(settings, unclipped, rng, contributors=contributors)
    return next_clip_norm(settings, clip_norm, fraction)


def noisy_mean_update(
    updates: Iterable[Arrays],
    shapes: Mapping[str, tuple[int, ...]],
    settings: UserDPSettings,
    clip_norm: float,
    rng: np.random.Generator,
    *,
    extra_sum: Arrays | None = None,
) -> UserDPRound:
    """One round of DP-FedAvg over the sampled sites' updates (deltas from the global adapter).

    `updates` may be empty (no site sampled, or all dropped): the noise alone is released, as
    the mechanism's analysis requires. It is read once, one update at a time (a streaming
    round folds each reply as it arrives). `extra_sum` holds contributions already at or below the
    clip norm that join the sum unclipped and uncounted (an auditing run's canary clients).
    """
    total = {n: np.zeros(shape, dtype=np.float64) for n, shape in shapes.items()}
    unclipped = contributors = 0
    for update in updates:
        clipped, norm = clip_update(update, clip_norm)  # the norm stays in this loop
        unclipped += int(norm <= clip_norm)
        contributors += 1
        for n in total:
            total[n] += clipped[n]
    for n, value in (extra_sum or {}).items():
        total[n] += value
    std = settings.update_noise_multiplier * clip_norm
    mean = {
        n: ((t + rng.normal(0.0, std, size=t.shape)) / settings.expected_sites).astype(np.float32)
        for n, t in total.items()
    }
    next_clip, noisy_clipped = clip_norm, None
    if settings.adaptive:
        fraction = noisy_unclipped_fraction(settings, unclipped, rng, contributors=contributors)
        next_clip = next_clip_norm(settings, clip_norm, fraction)
        noisy_clipped = settings.expected_sites * (1.0 - fraction)
    return UserDPRound(
        mean_update=mean,
        clip_norm=clip_norm,
        next_clip_norm=next_clip,
        contributors=contributors,
        clipped=contributors - unclipped,
        update_noise_std=std / settings.expected_sites,
        noisy_clipped=noisy_clipped,
    )
