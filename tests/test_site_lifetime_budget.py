"""A site's own ε cap holds over every run on its records, whatever the coordinator names
them (issue 16): the site's ClientApp in-process, tiny model, real Opacus DP-SGD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from clients.app import create_app
from fedllm import wire
from fedllm.privacy.ledger import Ledger
from fedllm.rundir import RunDir
from fedllm.site_ledgers import LIFETIME_DIR
from tests.test_site_ledger_order import train_instruction


def _site(tmp_path: Path, cap: float) -> Context:
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "state")}
    return Context(1, 7, {**node, "epsilon-max": cap}, RecordDict(), {})


@pytest.fixture()
def overrides(tiny_model_dir: Path, tmp_path: Path) -> dict[str, object]:
    return {
        "model.name": str(tiny_model_dir),
        "run.output-dir": str(tmp_path / "runs"),
        "privacy.mode": "record",
        "train.local-steps": 1,
        "train.batch-size": 8,
    }


def _round(app: object, overrides: dict[str, object], name: str, site: Context) -> object:
    return app(train_instruction(overrides, run_name=name, server_round=1), site)


def _lifetime(tmp_path: Path) -> list[dict[str, object]]:
    (path,) = (tmp_path / "state" / LIFETIME_DIR).glob("*.jsonl")
    return Ledger(path).records()


def test_a_new_run_name_does_not_reset_the_sites_own_cap(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    """One round under run name 'first' spends ε1. The coordinator then starts 'second':
    that run's own history is empty and one round fits the cap, but the site's lifetime on
    these records would pass it, so the site refuses and writes nothing."""
    # Prepare
    app = create_app(overrides)
    first = app(
        train_instruction(overrides, run_name="first", server_round=1), _site(tmp_path, 1e6)
    )
    eps1 = float(first.content[wire.METRICS][wire.EPSILON])
    cap = eps1 * 1.01  # above one round, below two
    # Execute
    second = app(
        train_instruction(overrides, run_name="second", server_round=1), _site(tmp_path, cap)
    )
    # Assert
    reason = wire.refusal_reason(second.content)
    assert reason is not None and "lifetime" in reason and f"budget of {cap:g}" in reason
    assert [r["run_id"] for r in _lifetime(tmp_path)] == ["first"]
    assert not RunDir.site_ledger_path(tmp_path / "state" / "second", 0).exists()


def test_the_lifetime_ledger_holds_every_run_and_the_run_ledger_only_its_own(
    overrides: dict[str, object], tmp_path: Path
) -> None:
    # Prepare
    app = create_app(overrides)
    # Execute
    for name in ("first", "second"):
        reply = app(
            train_instruction(overrides, run_name=name, server_round=1), _site(tmp_path, 1e6)
        )
        assert wire.refusal_reason(reply.content) is None
    # Assert
    assert [r["run_id"] for r in _lifetime(tmp_path)] == ["first", "second"]
    for name in ("first", "second"):
        run = Ledger(RunDir.site_ledger_path(tmp_path / "state" / name, 0)).records()
        assert [r["run_id"] for r in run] == [name]
    # the lifetime ledger is keyed by the records, not by anything the coordinator named
    (path,) = (tmp_path / "state" / LIFETIME_DIR).glob("*.jsonl")
    assert len(path.stem) == 64 and "first" not in json.dumps(str(path))


def test_site_budget_shows_each_runs_spend_and_the_lifetime_against_the_cap(
    overrides: dict[str, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    from fedllm.cli import main as cli

    app = create_app(overrides)
    eps = [
        float(_round(app, overrides, n, _site(tmp_path, 1e6)).content[wire.METRICS][wire.EPSILON])
        for n in ("first", "second")
    ]
    state = str(tmp_path / "state")
    # Execute
    code = cli(["site", "budget", "--state-dir", state, "--epsilon-max", str(eps[0] * 1.01)])
    out = capsys.readouterr().out
    # Assert
    assert code == 0
    assert f"run first: 1 rounds, epsilon within the run {eps[0]:.4f}" in out
    assert f"run second: 1 rounds, epsilon within the run {eps[1]:.4f}" in out
    lifetime = float(out.split("lifetime epsilon ")[1].split()[0])
    assert lifetime > max(eps) and "PAST" in out


def test_site_budget_names_a_directory_without_lifetime_ledgers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedllm.cli import main as cli

    assert cli(["site", "budget", "--state-dir", str(tmp_path)]) == 2
    assert "no lifetime ledger under" in capsys.readouterr().err
