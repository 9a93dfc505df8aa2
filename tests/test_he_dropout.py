"""The coordinator's handling of a distributed-DP round under HE when noise shares are missing.

Real contexts, real ciphertexts, the real `FederatedRun` and ledger; no Flower messaging
(the round's replies are already summed), so every policy can be forced deterministically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedllm.config import parse_config
from fedllm.model import adapter_spec
from fedllm.privacy.accounting import epsilon_report
from fedllm.privacy.ledger import USER_GAUSSIAN, Ledger
from fedllm.privacy.verify import verify_records
from fedllm.rundir import RunDir
from fedllm.secure.he import PUBLIC_CONTEXT, SECRET_CONTEXT, payload_digest, write_key_files
from fedllm.secure.he_site import SiteHE
from server.app import FederatedRun

SIGMA = 1.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    write_key_files(parse_config({}).he.params, out)
    return out


def _run(tiny_model_dir: Path, keys: Path, out: Path, **extra: Any) -> FederatedRun:
    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "run.name": "r",
            "run.output-dir": str(out),
            "privacy.mode": "user",
            "privacy.user-noise-multiplier": SIGMA,
            "strategy.secure-aggregation": "he",
            "he.public-context": str(keys / PUBLIC_CONTEXT),
            "he.site-context": str(keys / SECRET_CONTEXT),
            **extra,
        }
    )
    run = FederatedRun(
        None, cfg, RunDir.create(cfg, {"rounds_completed": 0}), adapter_spec(cfg.model, cfg.lora)
    )
    run.num_sites = 3
    return run


def _two_of_three(run: FederatedRun) -> Any:
    """A round's sum holding sites 0 and 1 only (site 2 dropped)."""
    site = SiteHE.load(run.cfg, run.cfg.he.site_context, site=0)
    total = run.he.new_sum()
    for s in (0, 1):
        update = {n: np.full(shape, 0.01 * (s + 1)) for n, shape in run.expected.items()}
        blobs = site.seal(update, weight=1 / 3, num_sites=3)
        total.add(
            blobs,
            weight=1 / 3,
            key=site.key,
            digest=payload_digest(blobs),
            sender=f"site {s}",
            site=s,
        )
    return total


def test_abort_policy_discards_the_round_unread_and_spends_nothing(
    tiny_model_dir: Path, keys: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model_dir, keys, tmp_path, **{"he.on-dropout": "abort"})
    assert run._he_commit(1, _two_of_three(run)) is True
    assert run.he.global_blobs is None  # the global adapter stays as it was
    assert "abort" in run.state["secure_aggregation"]["rounds"][0]["aborted"]
    assert Ledger(run.run.path / "ledger.jsonl").records() == []


def test_account_policy_records_the_noise_actually_present(
    tiny_model_dir: Path, keys: Path, tmp_path: Path
) -> None:
    run = _run(tiny_model_dir, keys, tmp_path)
    run._user_budget_allows(1, SIGMA, 1.0)
    assert run._he_commit(1, _two_of_three(run)) is True
    records = Ledger(run.run.path / "ledger.jsonl").records()
    z = SIGMA * math.sqrt(2 / 3)
    assert [r["mechanism"] for r in records] == [USER_GAUSSIAN]
    assert records[0]["noise_multiplier"] == pytest.approx(z)
    assert records[0]["planned_noise_multiplier"] == SIGMA
    assert records[0]["guarantee"] == pytest.approx(
        epsilon_report([(z, 1.0, 1)], delta=1e-5)["epsilon"]
    )
    assert verify_records(records) == []
    assert run.he.global_blobs is not None and run.he.divisor == pytest.approx(2 / 3)


def test_budget_that_only_the_planned_noise_meets_stops_the_run_unreleased(
    tiny_model_dir: Path, keys: Path, tmp_path: Path
) -> None:
    """The budget allows one round at σ but not at σ·sqrt(2/3): the round with a dropped
    site is not released and the run stops, instead of recording more ε than allowed."""
    planned = float(epsilon_report([(SIGMA, 1.0, 1)], delta=1e-5)["epsilon"])
    run = _run(tiny_model_dir, keys, tmp_path, **{"privacy.user-epsilon-max": planned + 1e-6})
    assert run._user_budget_allows(1, SIGMA, 1.0)
    assert run._he_commit(1, _two_of_three(run)) is False
    assert run.state["status"] == "stopped" and "budget" in run.state["stop_reason"]
    assert run.he.global_blobs is None
    assert Ledger(run.run.path / "ledger.jsonl").records() == []


def test_server_given_the_secret_context_refuses_to_start(
    tiny_model_dir: Path, keys: Path, tmp_path: Path
) -> None:
    from fedllm.errors import KeyFileError

    with pytest.raises(KeyFileError, match="holds the CKKS secret key"):
        _run(tiny_model_dir, keys, tmp_path, **{"he.public-context": str(keys / SECRET_CONTEXT)})
