"""User-level DP-FedAvg: clipping, fixed denominator, noise scale, adaptive clipping, and the
multiplier the coordinator's user-level stage records against the noise it adds."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.config import parse_config
from fedllm.errors import ConfigError
from fedllm.model import adapter_spec
from fedllm.privacy.userdp import (
    WITHHELD,
    UserDPSettings,
    adaptive_update_noise,
    clip_update,
    l2_norm,
    noisy_mean_update,
    poisson_sample,
    update_clip_norm,
)
from fedllm.rundir import RunDir
from fedllm.strategy.base import RunContext
from fedllm.strategy.book import RunBook
from fedllm.strategy.user_dp import UserDP
from fedllm.wire import ARRAYS, METRICS, NUM_EXAMPLES, SITE, arrays_to_record, record_to_arrays
from tests.coordinator import Recorder
from tests.replies import mock_reply

pytestmark = pytest.mark.usefixtures("coordinator_identity")  # the stages build Messages

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
    grown = update_clip_norm(settings, 1.0, unclipped=0, rng=rng, contributors=100)
    shrunk = update_clip_norm(settings, 1.0, unclipped=100, rng=rng, contributors=100)
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


class _ZeroNoise:
    """A generator that adds no noise but records the std of every Gaussian draw, so a test
    sees exactly what noise the mechanism adds, and where."""

    def __init__(self) -> None:
        self.update_stds: list[float] = []  # draws on the update sum (one per tensor)
        self.count_stds: list[float] = []  # scalar draws (the adaptive count)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        (self.count_stds if size is None else self.update_stds).append(float(scale))
        return np.zeros(size) if size is not None else 0.0

    def random(self) -> float:
        raise AssertionError("q = 1 samples every site without drawing")


def _user_dp_round(
    tiny_model_dir: Path, run_dir: Path, clipping: str, norms: list[float]
) -> tuple[dict[str, Any], np.ndarray, float, _ZeroNoise, dict[str, Any]]:
    """One round of the coordinator's user-level stage over sites whose updates have these
    L2 norms (q = 1, 10 sites in the population, z = 1, σ_b = 0.6, S = 1, η = 0.2, γ = 0.5),
    with noise 0. Returns the ledger record, the released sum of updates (mean · qN), the
    released count statistic (the noisy fraction · qN, read back from the next clip norm),
    the noise the stage asked for, and the round as the stage's state records it."""
    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "privacy.mode": "user",
            "privacy.user-clipping": clipping,
            "privacy.user-noise-multiplier": 1.0,
            "privacy.user-count-stddev": 0.6,
            "privacy.user-clip": 1.0,
            "strategy.fraction-train": 1.0,
        }
    )
    ctx = RunContext(
        cfg=cfg,
        spec=adapter_spec(cfg.model, cfg.lora),
        book=RunBook(),
        run=RunDir(path=run_dir, state={}),
        num_sites=10,
    )
    ctx.arrays = {n: np.zeros(s, np.float32) for n, s in ctx.expected.items()}
    first = next(iter(ctx.expected))
    stage = UserDP(ctx).wrap(Recorder())
    stage.begin()
    stage.rng = rng = _ZeroNoise()
    stage.configure_train(1, ArrayRecord(), ConfigRecord(), None)
    replies = []
    for site, norm in enumerate(norms):
        update = {n: np.zeros(s, np.float32) for n, s in ctx.expected.items()}
        update[first].flat[site] = norm  # site k moves its own coordinate
        content = RecordDict(
            {
                ARRAYS: arrays_to_record(update),
                METRICS: MetricRecord({SITE: site, NUM_EXAMPLES: 10}),
            }
        )
        replies.append(mock_reply(content, node_id=site + 1))
    arrays, _ = stage.aggregate_train(1, replies)
    assert arrays is not None
    released = np.concatenate([a.ravel() for a in record_to_arrays(arrays).values()])
    expected_sites = stage.settings.expected_sites
    next_clip = stage.state["user_dp"]["clip_norm"]
    fraction = 0.5 - math.log(next_clip / 1.0) / 0.2  # C' = C exp(-η (f - γ))
    (record,) = ctx.ledger().records()
    (recorded,) = stage.state["user_dp"]["rounds"]
    return record, released * expected_sites, fraction * expected_sites, rng, recorded


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_the_ledger_multiplier_is_the_one_the_noise_added_and_its_sensitivity_give(
    clipping: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """z in the ledger is (z_Δ⁻² + z_b⁻²)^-½, each multiplier the std of the noise actually
    added over the sensitivity of what it was added to, measured on neighbouring sets of sites
    (one site added, its update clipped or not). With adaptive clipping at z = 1, σ_b = 0.6 a
    raw count (sensitivity 1) would make the truth 0.57; centred bits make it 1."""
    # Prepare
    base = [0.3, 0.5, 2.0, 4.0]  # two updates under S = 1, two clipped
    # Execute
    record, sums, count, rng, _ = _user_dp_round(tiny_model_dir, tmp_path / "d", clipping, base)
    _, sums_small, count_small, _, _ = _user_dp_round(
        tiny_model_dir, tmp_path / "d-small", clipping, [*base, 0.2]
    )
    _, sums_big, count_big, _, _ = _user_dp_round(
        tiny_model_dir, tmp_path / "d-big", clipping, [*base, 3.0]
    )
    # Assert
    update_std = set(rng.update_stds)
    assert len(update_std) == 1  # the same std on every tensor
    sensitivity = max(np.linalg.norm(s - sums) for s in (sums_small, sums_big))
    assert sensitivity == pytest.approx(1.0)  # S: the added site's clipped update
    z_update = update_std.pop() / sensitivity
    assert record["update_noise_multiplier"] == pytest.approx(z_update, rel=1e-6)
    if clipping == "adaptive":
        (count_std,) = rng.count_stds
        count_sensitivity = max(abs(c - count) for c in (count_small, count_big))
        z_count = count_std / count_sensitivity
        derived = (z_update**-2 + z_count**-2) ** -0.5
    else:
        assert rng.count_stds == []  # fixed clipping releases no count
        derived = z_update
    assert record["noise_multiplier"] == pytest.approx(derived, rel=1e-6)
    assert derived == pytest.approx(1.0, rel=1e-6)  # the configured z


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_a_round_records_no_site_norm_exact_count_or_which_sites_took_part(
    clipping: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The stage's record of a round and its ledger record hold the released figures: no
    update norm, no exact clipped count, no sampled sites or number of contributors. With
    adaptive clipping the count it records is the noised one the clip norm moved on (here,
    noise 0: q·N/2 − Σ(b − ½) = 10/2 − (2 − 4/2) = 5, not the exact 2); fixed clipping
    records none."""
    # Prepare
    norms = [0.31415, 0.27182, 2.71828, 4.66920]  # two under S = 1, two clipped
    # Execute
    record, _, count, _, recorded = _user_dp_round(tiny_model_dir, tmp_path, clipping, norms)
    text = json.dumps([record, recorded])
    # Assert
    assert not set(WITHHELD) & set(recorded)
    assert not {"sampled_sites", "contributors"} & set(record)
    spellings = {json.dumps(n) for n in norms} | {json.dumps(float(np.float32(n))) for n in norms}
    assert not any(s in text for s in spellings)
    assert recorded["clip_norm"] == record["clip_norm"] == 1.0
    assert record["expected_sites"] == 10.0 and record["sample_rate"] == 1.0
    if clipping == "adaptive":
        assert recorded["clipped_noisy"] == pytest.approx(5.0)
        assert recorded["clipped_noisy"] == pytest.approx(10.0 - count)  # what moved S
    else:
        assert "clipped_noisy" not in recorded


def test_the_noised_count_is_what_the_clip_norm_moved_on() -> None:
    """`noisy_mean_update` reports q·N · (1 − b̄) for the b̄ it stepped the clip norm with,
    drawing the same noise as `update_clip_norm`; with fixed clipping no count at all."""
    # Prepare
    settings = UserDPSettings(
        noise_multiplier=1.0,
        clip_norm=1.0,
        sample_rate=0.5,
        num_sites=20,
        adaptive=True,
        count_stddev=0.6,
    )
    fixed = UserDPSettings(noise_multiplier=1.0, clip_norm=1.0, sample_rate=0.5, num_sites=20)
    updates = [_update(s, k) for k, s in enumerate((1e-3, 1e-3, 10.0))]
    # Execute
    out = noisy_mean_update(updates, SHAPES, settings, 1.0, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    for shape in SHAPES.values():
        rng.normal(0.0, 1.0, size=shape)  # the update noise comes first
    step = update_clip_norm(settings, 1.0, unclipped=2, rng=rng, contributors=3)
    plain = noisy_mean_update(updates, SHAPES, fixed, 1.0, np.random.default_rng(7))
    # Assert
    fraction = 1.0 - out.noisy_clipped / settings.expected_sites
    assert out.next_clip_norm == pytest.approx(step)
    assert out.next_clip_norm == pytest.approx(math.exp(-0.2 * (fraction - 0.5)))
    assert not hasattr(out, "norms")
    assert plain.noisy_clipped is None
