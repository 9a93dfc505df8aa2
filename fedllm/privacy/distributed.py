"""Distributed DP for homomorphic aggregation: every site adds its share of the noise.

Under HE the coordinator cannot clip or noise the sum, so each of the n sites clips its own
update Δ_k to norm S and adds N(0, σ²S²/n) before encrypting (the distributed Gaussian of
Kairouz et al. 2021, without the discretisation: CKKS sums reals). The sum of n honest
contributions carries N(0, σ²S²), the same as a central DP-FedAvg step with noise
multiplier σ and sensitivity S (add/remove one site's data; q = 1, every site every round).

If only m < n contributions reach the sum, it carries variance mσ²S²/n: the noise actually
present is σ·sqrt(m/n). But every site decrypts the sum and knows its own share, so a
curious site can subtract it: against such a site only the other m − 1 shares remain,
σ·sqrt((m−1)/n) (with a single contributor, its own share is all that protects it from the
others). The ledger records both, and accounts the weaker one unless the run declares
every site honest (`he.noise-assumption`). More than n shares (sites that joined after the
run started) only add noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedllm.privacy.userdp import clip_update

__all__ = [
    "curious_site_noise_multiplier",
    "effective_noise_multiplier",
    "noisy_clipped_contribution",
    "site_noise_std",
]


def site_noise_std(noise_multiplier: float, clip_norm: float, num_sites: int) -> float:
    """Per-coordinate std each site adds: σS/√n, so n sites together add σS."""
    if num_sites < 1:
        raise ValueError("distributed noise needs at least one site")
    return noise_multiplier * clip_norm / math.sqrt(num_sites)


def effective_noise_multiplier(noise_multiplier: float, present: int, expected: int) -> float:
    """The noise multiplier of a sum that holds `present` noise shares, each of variance
    σ²S²/`expected` (present may exceed expected: late sites add noise)."""
    if present < 0 or expected < 1:
        raise ValueError(f"present ({present}) must be >= 0 and expected ({expected}) >= 1")
    return noise_multiplier * math.sqrt(present / expected)


def curious_site_noise_multiplier(noise_multiplier: float, present: int, expected: int) -> float:
    """The noise multiplier a site that subtracts its own share still faces: the shares of
    the other contributors (with one contributor, its share protects it from every other)."""
    return effective_noise_multiplier(noise_multiplier, max(present - 1, min(present, 1)), expected)


def noisy_clipped_contribution(
    global_arrays: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_sites: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float]:
    """global + clip(trained − global, S) + N(0, σ²S²/n): what a site encrypts, and the
    unclipped norm of its update (it stays at the site)."""
    delta = {n: np.asarray(trained[n], np.float64) - global_arrays[n] for n in global_arrays}
    clipped, norm = clip_update(delta, clip_norm)
    std = site_noise_std(noise_multiplier, clip_norm, num_sites)
    out = {
        n: np.asarray(global_arrays[n], np.float64) + clipped[n] + rng.normal(0.0, std, v.shape)
        for n, v in clipped.items()
    }
    return out, norm
