"""Distributed DP under HE accounts the noise a curious site still faces (issue 15, item 2),
and the canary-client auditing baseline samples its sites once (item 4).

Every site decrypts the aggregate and knows its own noise share, so against a site that
subtracts it, m of n shares leave z·sqrt((m−1)/n), not z·sqrt(m/n). The ledger states
both; the guarantee is the weaker one unless the run declares every site honest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fedllm.config import parse_config
from fedllm.model import adapter_spec
from fedllm.privacy.ledger import Ledger
from fedllm.privacy.verify import verify_records
from fedllm.strategy.base import RunContext, Stage
from fedllm.strategy.book import RunBook
from fedllm.strategy.flower import build_inner
from fedllm.strategy.pipeline import Pipeline
from tests.coordinator import coordinator_run, he_settings

Z = 1.0


def _ddp(tiny_model_dir: Path, he_keys: Path, out: Path, **extra: Any) -> Any:
    overrides = {
        "privacy.mode": "user",
        "privacy.user-noise-multiplier": Z,
        **he_settings(he_keys),
        **extra,
    }
    run = coordinator_run(tiny_model_dir, out, build=False, **overrides)
    return run, run.pipeline.stage("distributed-dp")


def test_by_default_a_round_is_accounted_at_the_noise_a_curious_site_still_faces(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    # Prepare
    run, ddp = _ddp(tiny_model_dir, he_keys, tmp_path)
    # Execute: all three shares arrived
    z = ddp.account(1, [0, 1, 2])
    # Assert
    [record] = Ledger(run.ctx.run.ledger_path).records()
    assert z == pytest.approx(Z * math.sqrt(2 / 3))
    assert record["noise_multiplier"] == pytest.approx(Z * math.sqrt(2 / 3))
    assert record["noise_multiplier_all_shares"] == pytest.approx(Z)
    assert record["noise_multiplier_curious_site"] == pytest.approx(Z * math.sqrt(2 / 3))
    assert record["noise_assumption"] == "curious-site"
    assert verify_records([record]) == []


def test_a_run_that_declares_every_site_honest_is_accounted_at_every_share(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    # Prepare
    run, ddp = _ddp(tiny_model_dir, he_keys, tmp_path, **{"he.noise-assumption": "honest-sites"})
    # Execute
    z = ddp.account(1, [0, 1, 2])
    # Assert
    [record] = Ledger(run.ctx.run.ledger_path).records()
    assert z == pytest.approx(Z) and record["noise_multiplier"] == pytest.approx(Z)
    assert record["noise_multiplier_curious_site"] == pytest.approx(Z * math.sqrt(2 / 3))
    assert run.summary()["user_level"]["noise_assumption"] == "honest-sites"


def test_more_shares_than_sites_at_the_start_do_not_raise(
    tiny_model_dir: Path, he_keys: Path, tmp_path: Path
) -> None:
    """A fourth site joins after the run started with three: its share adds noise."""
    # Prepare
    run, ddp = _ddp(tiny_model_dir, he_keys, tmp_path)
    # Execute
    z = ddp.account(1, [0, 1, 2, 3])
    # Assert
    assert z == pytest.approx(Z * math.sqrt(3 / 3))


def test_the_canary_client_baseline_samples_its_sites_once(tiny_model_dir: Path) -> None:
    """privacy.mode = "none" with canary clients: the user-level stage Poisson-samples the
    sites at strategy.fraction-train, so the Flower strategy must ask every site."""
    # Prepare
    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "privacy.mode": "none",
            "audit.canary-clients": 20,
            "strategy.fraction-train": 0.5,
        }
    )
    ctx = RunContext(cfg=cfg, spec=adapter_spec(cfg.model, cfg.lora), book=RunBook(), num_sites=4)
    # Execute
    outer = Pipeline(ctx).build()
    assert isinstance(outer, Stage)
    inner = outer.flower
    # Assert
    assert inner.fraction_train == 1.0
    assert (
        build_inner(parse_config({"strategy.fraction-train": 0.5}), num_sites=4).fraction_train
        == 0.5
    )
