"""User-level DP-FedAvg maths: clipping, fixed denominator, noise scale, adaptive clipping."""

from __future__ import annotations

import numpy as np
import pytest

from fedllm.errors import ConfigError
from fedllm.privacy.userdp import (
    UserDPSettings,
    adaptive_update_noise,
    clip_update,
    l2_norm,
    noisy_mean_update,
    poisson_sample,
    update_clip_norm,
)

SHAPES = {"a": (4, 3), "b": (5,)}


def _update(scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def _norm(arrays: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in arrays.values()))
    )


def test_clip_scales_the_whole_update_to_the_norm_and_keeps_small_ones() -> None:
    """The L2 norm over all tensors is clipped jointly; a small update passes unchanged."""
    # Prepare
    big, small = _update(10.0, 1), _update(1e-3, 2)
    # Execute
    clipped, norm = clip_update(big, 1.0)
    kept, small_norm = clip_update(small, 1.0)
    # Assert
    assert norm == pytest.approx(_norm(big))
    assert _norm(clipped) == pytest.approx(1.0, rel=1e-6)
    ratio = clipped["a"] / big["a"]
    assert np.allclose(ratio, ratio.flat[0])  # a rescaling, not a per-tensor clip
    assert small_norm < 1.0 and all(np.allclose(kept[n], small[n]) for n in SHAPES)


def test_noiseless_mean_divides_by_the_expected_not_the_actual_number_of_sites() -> None:
    """With noise 0 the mean is Σ clip(Δ_i) / (q·N): a site that drops shrinks the sum only."""
    # Prepare
    settings = UserDPSettings(noise_multiplier=1e-12, clip_norm=1.0, sample_rate=1.0, num_sites=4)
    updates = [_update(1e-3, s) for s in range(3)]  # one of four sites dropped
    # Execute
    out = noisy_mean_update(updates, SHAPES, settings, 1.0, np.random.default_rng(0))
    # Assert
    for n in SHAPES:
        assert np.allclose(out.mean_update[n], sum(u[n] for u in updates) / 4, atol=1e-9)
    assert out.contributors == 3 and out.clipped == 0


def test_noise_std_per_coordinate_is_z_times_clip_over_expected_sites() -> None:
    """Empirical noise std on a large zero update matches z·S/(q·N) within 2%."""
    # Prepare
    shapes = {"w": (200_000,)}
    settings = UserDPSettings(noise_multiplier=1.3, clip_norm=0.5, sample_rate=0.5, num_sites=8)
    # Execute
    out = noisy_mean_update([], shapes, settings, 0.5, np.random.default_rng(3))
    # Assert
    expected = 1.3 * 0.5 / 4
    assert out.update_noise_std == pytest.approx(expected)
    assert float(np.std(out.mean_update["w"])) == pytest.approx(expected, rel=0.02)


def test_adaptive_split_gives_the_update_more_noise_and_refuses_a_too_small_count_noise() -> None:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^-½ > z; σ_b ≤ z/2 is refused with the key named."""
    # Prepare
    ok = UserDPSettings(
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=1.0,
        num_sites=10,
        adaptive=True,
        count_stddev=2.0,
    )
    # Execute
    z_delta = ok.update_noise_multiplier
    # Assert
    assert z_delta == pytest.approx((1.0 - 4.0**-2) ** -0.5)
    with pytest.raises(ConfigError, match="privacy.user-count-stddev"):
        UserDPSettings(
            noise_multiplier=1.0, clip_norm=1.0, sample_rate=1.0, num_sites=10, adaptive=True
        )  # default σ_b = 10/20 = 0.5 = z/2


def test_clip_norm_moves_towards_the_target_quantile() -> None:
    """All updates clipped → the norm grows; none clipped → it shrinks (Andrew et al.)."""
    # Prepare
    settings = UserDPSettings(
        noise_multiplier=1e-6,
        clip_norm=1.0,
        sample_rate=1.0,
        num_sites=100,
        adaptive=True,
        count_stddev=1e-5,
        clip_learning_rate=0.2,
    )
    rng = np.random.default_rng(0)
    # Execute
    grown = update_clip_norm(settings, 1.0, unclipped=0, rng=rng)
    shrunk = update_clip_norm(settings, 1.0, unclipped=100, rng=rng)
    # Assert
    assert grown == pytest.approx(np.exp(0.2 * 0.5))
    assert shrunk == pytest.approx(np.exp(-0.2 * 0.5))


def test_poisson_sampling_keeps_each_site_with_probability_q() -> None:
    """Over many draws each site is kept about q of the time, independently; q=1 keeps all."""
    # Prepare
    rng = np.random.default_rng(0)
    # Execute
    draws = [poisson_sample(list(range(10)), 0.3, rng) for _ in range(4000)]
    # Assert
    counts = np.bincount([s for d in draws for s in d], minlength=10) / 4000
    assert np.allclose(counts, 0.3, atol=0.03)
    assert any(len(d) == 0 for d in draws)  # an empty round is possible, as the maths assumes
    assert poisson_sample([4, 5], 1.0, rng) == [4, 5]


def test_user_level_mode_refuses_zero_noise() -> None:
    """No silent downgrade: user-level DP with z = 0 is a config error naming the key."""
    # Prepare / Execute / Assert
    with pytest.raises(ConfigError, match="privacy.user-noise-multiplier"):
        UserDPSettings(noise_multiplier=0.0, clip_norm=1.0, sample_rate=1.0, num_sites=3)


def test_clipping_gives_flowers_numbers_bit_for_bit() -> None:
    """`clip_update` and `l2_norm` replace Flower's `clip_inputs_inplace`/`get_norm` (fedllm's
    maths imports no Flower) and must give exactly the numbers those gave."""
    # Prepare
    from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

    updates = [_update(scale, seed) for seed, scale in enumerate((10.0, 1.0, 1e-3, 0.3))]
    for update in updates:
        as_float64 = [np.array(update[n], dtype=np.float64) for n in SHAPES]
        expected = [a.copy() for a in as_float64]
        flower_norm = get_norm(expected)
        clip_inputs_inplace(expected, 0.5)
        # Execute
        clipped, norm = clip_update(update, 0.5)
        # Assert
        assert norm == flower_norm == l2_norm(as_float64)
        assert all(np.array_equal(clipped[n], e) for n, e in zip(SHAPES, expected, strict=True))


def test_the_adaptive_noise_split_gives_flowers_numbers() -> None:
    """z_Δ is what Flower's `compute_adaptive_noise_params` returned for the same z and σ_b
    (the run's numbers do not change with the rewrite)."""
    # Prepare
    from flwr.supercore.differential_privacy import compute_adaptive_noise_params

    settings = UserDPSettings(
        noise_multiplier=0.8, clip_norm=1.0, sample_rate=0.5, num_sites=200, adaptive=True
    )
    # Execute
    _, flower = compute_adaptive_noise_params(0.8, settings.expected_sites, settings.count_noise)
    # Assert
    assert settings.update_noise_multiplier == flower == adaptive_update_noise(0.8, 5.0)
