"""End-to-end encryption at rest: a real simulated DP run whose checkpoints and ledgers are
sealed under `security.at-rest-key`, audited, resumed, and refused under another key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.secure.at_rest import AtRestError, make_key_file
from tests.simulate import simulate

pytestmark = pytest.mark.slow

SITES = 3


def test_sealed_run_audits_resumes_and_refuses_another_key(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No plaintext adapter on disk, sealed ledgers that `fedllm audit verify` checks with the
    key (and refuses without it), `fedllm generate` from the sealed adapter, a resume to
    round 3, and a resume under a replaced key refused before anything is touched."""
    # Prepare
    from fedllm.cli import main as cli
    from fedllm.config import parse_config
    from fedllm.model import adapter_spec
    from fedllm.rundir import RunDir
    from fedllm.strategy.loop import FederatedRun

    key = make_key_file(tmp_path / "keys" / "at-rest.key")
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "sealed",
        "run.output-dir": str(tmp_path / "out"),
        "run.rounds": 2,
        "train.local-steps": 1,
        "train.batch-size": 16,
        "privacy.noise-multiplier": 0.8,
        "eval.max-examples": 8,
        "security.at-rest-key": str(key.path),
    }
    run_dir = tmp_path / "out" / "sealed"
    # Execute: two rounds, then the CLI on the sealed run
    simulate(overrides, sites=SITES)
    summary = json.loads((run_dir / "summary.json").read_text())
    verify_code = cli(["audit", "verify", str(run_dir)])
    verified = capsys.readouterr().out
    gen_code = cli(["generate", "--run", str(run_dir), "--max-new-tokens", "3", "What is AI?"])
    capsys.readouterr()
    stranger = make_key_file(tmp_path / "keys" / "stranger.key")
    stranger_code = cli(["audit", "verify", str(run_dir), "--at-rest-key", str(stranger.path)])
    refused = capsys.readouterr().err
    away = key.path.rename(key.path.with_name("elsewhere.key"))  # the key is not at hand
    keyless_code = cli(["audit", "verify", str(run_dir)])
    keyless = capsys.readouterr()
    away.rename(key.path)
    # Assert: sealed on disk, verifiable with the key
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["security"]["at_rest"] == {"cipher": "AES-256-GCM", "key_id": key.id}
    assert not list(run_dir.rglob("adapter_model.safetensors"))
    assert len(list(run_dir.rglob("adapter_model.safetensors.aes"))) == 2
    ledgers = [run_dir / "ledger.jsonl", *sorted(run_dir.glob("sites/*/ledger.jsonl"))]
    assert len(ledgers) == 1 + SITES
    for ledger in ledgers:
        raw = ledger.read_bytes()
        assert raw and b"noise_multiplier" not in raw and b"aes-256-gcm" in raw
    assert verify_code == 0 and verified.count("OK   /") == 1 + SITES
    assert "OK   cross-check" in verified
    assert gen_code == 0
    assert stranger_code == 2
    assert f"encrypted under at-rest key {key.id}, not {stranger.id}" in refused
    assert keyless_code == 2 and "OK " not in keyless.out
    assert str(key.path) in keyless.err and "--at-rest-key" in keyless.err

    # Execute: resume to round 3 under the same key
    simulate({**overrides, "run.rounds": 3}, sites=SITES)
    resumed = json.loads((run_dir / "summary.json").read_text())
    # Assert
    assert resumed["rounds_completed"] == 3
    assert cli(["audit", "verify", str(run_dir)]) == 0
    capsys.readouterr()

    # Prepare: the key file replaced by another key (same path, so the config still matches)
    make_key_file(key.path, force=True)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    cfg = parse_config({**overrides, "run.rounds": 4})
    run = FederatedRun(None, cfg, RunDir.find(cfg), adapter_spec(cfg.model, cfg.lora))
    # Execute / Assert: the coordinator refuses before any site is asked for anything
    with pytest.raises(AtRestError, match=rf"encrypted under at-rest key {key.id}, not "):
        run.execute()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
