"""Canaries that are directions in adapter space: white-box audits of both DP mechanisms.

Each canary k has a fixed random unit direction u_k over the trainable adapter tensors, and
is inserted with probability ½. Whenever an inserted canary is sampled (at the same rate as
what it impersonates) it adds an update exactly at the clip norm, C·u_k, to the clipped sum
before the noise:

- gradient canaries (record level; the white-box one-run audit of Steinke, Nasr and
  Jagielski 2023, §6): virtual records in the auditing site's DP-SGD batches; the score of
  a canary is −⟨final adapter − initial adapter, u_k⟩ (descent moves against a gradient),
  turned into an ε lower bound by
  `one_run_audit`;
- canary clients (user level; Andrew et al., ICLR 2024, arXiv 2302.03098): virtual sites in
  DP-FedAvg; the cosines of the inserted canaries against those never inserted give a
  Gaussian mechanism's μ and so an ε(δ) estimate.

Directions are regenerated from the seed whenever needed rather than kept: a thousand
directions of a 7B model's adapter would not fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedllm.privacy.audit.lower_bound import gaussian_mu_epsilon
from fedllm.privacy.userdp import poisson_sample

__all__ = ["CLIENTS", "GRADIENTS", "CanaryDirections", "flatten_arrays"]

GRADIENTS, CLIENTS = 0x6AD, 0xC11E  # seed tags: the two kinds never share directions


def flatten_arrays(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], dtype=np.float64).ravel() for n in names])


@dataclass(frozen=True)
class CanaryDirections:
    """One auditing run's canaries of one kind (`tag`), over adapter tensors `shapes`."""

    count: int
    seed: int
    shapes: dict[str, tuple[int, ...]]
    tag: int = CLIENTS

    @property
    def names(self) -> list[str]:
        """Tensors in sorted order: sites and auditors may list them differently."""
        return sorted(self.shapes)

    @property
    def dim(self) -> int:
        return int(sum(math.prod(s) for s in self.shapes.values()))

    @property
    def included(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.tag]).random(self.count) < 0.5

    def direction(self, k: int) -> np.ndarray:
        v = np.random.default_rng([self.seed, self.tag, k]).standard_normal(self.dim)
        return v / np.linalg.norm(v)

    def sample(self, sample_rate: float, rng: np.random.Generator) -> list[int]:
        """Inserted canaries taking part in this step or round, each w.p. `sample_rate`."""
        return poisson_sample([int(k) for k in np.flatnonzero(self.included)], sample_rate, rng)

    def contribution(self, canaries: Sequence[int], clip_norm: float) -> dict[str, np.ndarray]:
        """Σ S·c_k over `canaries`, as adapter-shaped arrays (each term already at the clip)."""
        total = np.zeros(self.dim, dtype=np.float64)
        for k in canaries:
            total += self.direction(k)
        total *= clip_norm
        out, start = {}, 0
        for name in self.names:
            shape = self.shapes[name]
            size = math.prod(shape)
            out[name] = total[start : start + size].reshape(shape)
            start += size
        return out

    def scores(self, delta: Mapping[str, np.ndarray]) -> np.ndarray:
        """⟨delta, u_k⟩ per canary (a gradient canary's score is its negation)."""
        flat = flatten_arrays(delta, self.names)
        return np.array([float(self.direction(k) @ flat) for k in range(self.count)])

    def cosines(self, delta: Mapping[str, np.ndarray]) -> np.ndarray:
        """cos(delta, u_k) per canary: the projections scaled by |delta| (u_k is unit)."""
        norm = float(np.linalg.norm(flatten_arrays(delta, self.names)))
        return self.scores(delta) / norm if norm > 0 else np.zeros(self.count)

    def estimate(
        self, delta: Mapping[str, np.ndarray], *, delta_dp: float, confidence: float = 0.95
    ) -> dict[str, object]:
        """μ and ε(δ) from the cosines, at the point estimate and at a one-sided lower
        confidence limit of the inserted canaries' mean (the figure compared with the proven
        ε, so sampling noise in the estimate cannot raise a false alarm)."""
        from scipy.stats import norm as normal  # heavy: scipy.stats takes ~1.5 s to import

        cos = self.cosines(delta)
        inc = self.included
        inserted, null = cos[inc], cos[~inc]
        point = gaussian_mu_epsilon(inserted, null, delta=delta_dp)
        se = float(np.std(inserted, ddof=1)) / math.sqrt(inserted.size)
        shift = float(normal.ppf(confidence)) * se
        lower = gaussian_mu_epsilon(inserted - shift, null, delta=delta_dp)
        return {
            "method": "canary clients, cosine statistic (Andrew et al. 2024)",
            "canary_clients": self.count,
            "inserted": int(inc.sum()),
            "mean_cosine_inserted": float(inserted.mean()),
            "mean_cosine_null": float(null.mean()),
            "std_cosine_null": float(np.std(null, ddof=1)),
            "mu": point["mu"],
            "epsilon_estimate": point["epsilon"],
            "mu_lower": lower["mu"],
            "epsilon_lower_bound": lower["epsilon"],
            "confidence": confidence,
            "delta": delta_dp,
        }
