"""Signing as the two apps apply it: refused keys stop a party before any training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.app import Context, RecordDict

from fedllm.config import parse_config
from fedllm.errors import KeyFileError
from fedllm.model import adapter_spec
from fedllm.mods.sign import signing_key
from fedllm.secure.pki import PkiLayout, init_pki
from fedllm.strategy.loop import FederatedRun


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiLayout:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root, hosts=["localhost"], sites=["site-0", "site-1"])
    return PkiLayout(root)


def _context(node_config: dict[str, str | int]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _cfg(pki: PkiLayout, tiny_model_dir: Path, **extra: object) -> object:
    return parse_config(
        {
            "model.name": str(tiny_model_dir),
            "security.sign-updates": True,
            "security.registry": str(pki.registry),
            "security.coordinator-key": str(pki.coordinator_key),
            "security.site-signing-key": str(
                pki.root / "sites" / "site-{partition}" / "signing.key"
            ),
            **extra,
        }
    )


def test_the_coordinator_refuses_to_start_without_its_registry(
    pki: PkiLayout, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = _cfg(pki, tiny_model_dir, **{"security.registry": str(tmp_path / "missing.json")})
    with pytest.raises(KeyFileError, match=r"no signing-key registry at .*missing.json"):
        FederatedRun(None, cfg, None, adapter_spec(cfg.model, cfg.lora))


def test_the_coordinator_loads_every_sites_key(pki: PkiLayout, tiny_model_dir: Path) -> None:
    cfg = _cfg(pki, tiny_model_dir)
    run = FederatedRun(None, cfg, None, adapter_spec(cfg.model, cfg.lora))
    registry = run.pipeline.stage("signatures").registry
    assert {k: s.name for k, s in registry.items()} == {0: "site-0", 1: "site-1"}


def _raw(public_key: object) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_a_site_finds_its_key_by_partition_or_node_config(
    pki: PkiLayout, tiny_model_dir: Path
) -> None:
    """The key a site signs with is the one the registry holds for the site it names: by its
    partition, or the node config's `signing-key` (which wins over the partition)."""
    cfg = _cfg(pki, tiny_model_dir)
    run = FederatedRun(None, cfg, None, adapter_spec(cfg.model, cfg.lora))
    registered = {
        k: _raw(s.public_key) for k, s in run.pipeline.stage("signatures").registry.items()
    }
    assert registered[0] != registered[1]
    by_partition = signing_key(cfg, _context({"partition-id": 1}), 1)
    assert _raw(by_partition.public_key()) == registered[1]
    explicit = signing_key(cfg, _context({"signing-key": str(pki.signing_key("site-0"))}), 1)
    assert _raw(explicit.public_key()) == registered[0]
    assert signing_key(parse_config({}), _context({}), 0) is None  # signing off: no key read


def test_a_site_with_a_readable_or_missing_key_refuses_before_training(
    pki: PkiLayout, tiny_model_dir: Path
) -> None:
    cfg = _cfg(pki, tiny_model_dir)
    key = pki.signing_key("site-1")
    os.chmod(key, 0o644)
    try:
        with pytest.raises(KeyFileError, match=rf"{key} .*readable by others"):
            signing_key(cfg, _context({}), 1)
    finally:
        os.chmod(key, 0o600)
    with pytest.raises(KeyFileError, match="no file at"):
        signing_key(cfg, _context({}), 5)
