"""Encryption at rest: sealed blobs, key files, sealed checkpoints and sealed ledgers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedllm.config import LoraConfig, ModelConfig
from fedllm.errors import KeyFileError
from fedllm.model import ADAPTER_FILE, load_adapter_arrays, save_peft_adapter
from fedllm.privacy.ledger import Ledger, verify_chain
from fedllm.privacy.verify import verify_records
from fedllm.secure.at_rest import (
    SUFFIX,
    AtRestError,
    AtRestKey,
    load_key,
    make_key_file,
    open_sealed,
    seal,
)
from fedllm.secure.he_checkpoint import (
    ENCRYPTED_ADAPTER,
    EncryptedAdapter,
    load_encrypted_adapter,
    save_encrypted_adapter,
)
from fedllm.secure.packing import Packing
from tests.test_privacy_ledger import _spend

ARRAYS = {
    "base_model.model.layer.q_proj.lora_A.weight": np.arange(16, dtype=np.float32).reshape(2, 8),
    "base_model.model.layer.q_proj.lora_B.weight": np.full((8, 2), 0.25, dtype=np.float32),
}


@pytest.fixture
def key(tmp_path: Path) -> AtRestKey:
    return make_key_file(tmp_path / "keys" / "at-rest.key")


@pytest.fixture
def other_key(tmp_path: Path) -> AtRestKey:
    return make_key_file(tmp_path / "keys" / "other.key")


def _ledger(path: Path, key: AtRestKey | None, rounds: int = 3) -> Ledger:
    ledger = Ledger(path, key=key)
    for k in range(1, rounds + 1):
        ledger.append(_spend(k))
    return ledger


def _checkpoint(directory: Path, key: AtRestKey | None, scale: float = 1.0) -> None:
    arrays = {n: a * scale for n, a in ARRAYS.items()}
    save_peft_adapter(
        directory,
        arrays,
        model_cfg=ModelConfig(name="tiny"),
        lora_cfg=LoraConfig(target_modules="q_proj"),
        at_rest=key,
    )


# -- sealed blobs and key files ---------------------------------------------------------------
def test_sealed_blob_round_trips_and_hides_the_plaintext(key: AtRestKey) -> None:
    """A blob opens to its plaintext; two seals of one message differ (a fresh nonce each)."""
    # Prepare
    message = b'{"noise_multiplier": 0.8}'
    # Execute
    first = seal(key, message, aad=b"label")
    second = seal(key, message, aad=b"label")
    # Assert
    assert open_sealed(key, first, aad=b"label", what="blob") == message
    assert first != second
    assert b"noise_multiplier" not in first
    assert key.id in first.decode("ascii", errors="replace")
    assert repr(key.secret) not in repr(key)  # the secret never reaches a log line


def test_a_wrong_key_is_refused_naming_both_key_ids(key: AtRestKey, other_key: AtRestKey) -> None:
    """Opening under another key says which key sealed it and which was given."""
    # Prepare
    blob = seal(key, b"secret", aad=b"x")
    # Execute / Assert
    with pytest.raises(
        AtRestError,
        match=rf"blob was encrypted under at-rest key {key.id}, "
        rf"not {other_key.id} .*security.at-rest-key",
    ):
        open_sealed(other_key, blob, aad=b"x", what="blob")


def test_another_label_fails_the_integrity_check(key: AtRestKey) -> None:
    """A blob opened as something else (other associated data) is refused."""
    blob = seal(key, b"secret", aad=b"round-1")
    with pytest.raises(AtRestError, match="fails its AES-GCM integrity check"):
        open_sealed(key, blob, aad=b"round-2", what="blob")


def test_a_key_file_is_0600_and_never_overwritten_without_force(tmp_path: Path) -> None:
    """`make_key_file` writes 32 private bytes once; a second call needs `force`."""
    # Prepare
    path = tmp_path / "at-rest.key"
    first = make_key_file(path)
    # Execute
    with pytest.raises(KeyFileError, match="exists; refusing to overwrite"):
        make_key_file(path)
    kept = load_key(path)
    replaced = make_key_file(path, force=True)
    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert kept.id == first.id and len(first.id) == 16
    assert replaced.id != first.id and load_key(path).id == replaced.id


def test_a_key_file_readable_by_others_is_refused(key: AtRestKey) -> None:
    """A key file with mode 0644 is refused, naming the file and the fix."""
    os.chmod(key.path, 0o644)
    with pytest.raises(KeyFileError, match=rf"{key.path}.*readable by others.*chmod 600"):
        load_key(key.path)


def test_a_key_file_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    """Anything but exactly 32 bytes (a hex string, a truncated copy) is not a key."""
    path = tmp_path / "hex.key"
    path.write_text(os.urandom(32).hex())
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=r"holds 64 bytes, not a 32-byte at-rest key"):
        load_key(path)


def test_cli_at_rest_init_writes_a_key_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`fedllm keys at-rest-init` prints the key id; run again it refuses (exit 2)."""
    from fedllm.cli import main as cli

    out = tmp_path / "at-rest.key"
    first = cli(["keys", "at-rest-init", "--out", str(out)])
    printed = capsys.readouterr().out
    again = cli(["keys", "at-rest-init", "--out", str(out)])
    error = capsys.readouterr().err
    assert first == 0 and load_key(out).id in printed
    assert again == 2 and "refusing to overwrite" in error


# -- checkpoints -----------------------------------------------------------------------------
def test_sealed_checkpoint_round_trips_without_a_plaintext_tensor_file(
    key: AtRestKey, tmp_path: Path
) -> None:
    """With a key, only `adapter_model.safetensors.aes` holds the tensors, and it opens."""
    # Execute
    _checkpoint(tmp_path / "round-1", key)
    back = load_adapter_arrays(tmp_path / "round-1", at_rest=key)
    # Assert
    names = sorted(p.name for p in (tmp_path / "round-1").iterdir())
    assert ADAPTER_FILE not in names and ADAPTER_FILE + SUFFIX in names
    assert "adapter_config.json" in names  # plaintext: rank and targets, no weights
    raw = (tmp_path / "round-1" / (ADAPTER_FILE + SUFFIX)).read_bytes()
    assert b"lora_A" not in raw and ARRAYS[next(iter(ARRAYS))].tobytes()[:32] not in raw
    for name, value in ARRAYS.items():
        np.testing.assert_array_equal(back[name], value)


def test_a_flipped_byte_in_a_sealed_checkpoint_is_refused_naming_the_file(
    key: AtRestKey, tmp_path: Path
) -> None:
    """One flipped ciphertext byte: refused, naming the file; the file is left as it was."""
    # Prepare
    _checkpoint(tmp_path / "round-1", key)
    path = tmp_path / "round-1" / (ADAPTER_FILE + SUFFIX)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    # Execute / Assert
    with pytest.raises(AtRestError, match=rf"{path} fails its AES-GCM integrity check"):
        load_adapter_arrays(tmp_path / "round-1", at_rest=key)
    assert path.read_bytes() == bytes(data)


def test_a_checkpoint_swapped_in_from_another_round_is_detected(
    key: AtRestKey, tmp_path: Path
) -> None:
    """Round 1's sealed file copied over round 2's (a rollback) fails: the AAD names the round."""
    # Prepare
    _checkpoint(tmp_path / "round-1", key, scale=1.0)
    _checkpoint(tmp_path / "round-2", key, scale=2.0)
    sealed = ADAPTER_FILE + SUFFIX
    (tmp_path / "round-2" / sealed).write_bytes((tmp_path / "round-1" / sealed).read_bytes())
    # Execute / Assert
    with pytest.raises(AtRestError, match="round-2.*fails its AES-GCM integrity check"):
        load_adapter_arrays(tmp_path / "round-2", at_rest=key)


def test_plaintext_and_sealed_checkpoints_are_each_refused_in_the_other_mode(
    key: AtRestKey, tmp_path: Path
) -> None:
    """A sealed checkpoint without a key, or a plaintext one while a key is set: refused."""
    _checkpoint(tmp_path / "sealed" / "round-1", key)
    _checkpoint(tmp_path / "plain" / "round-1", None)
    with pytest.raises(AtRestError, match=rf"encrypted at rest \(key {key.id}\).*--at-rest-key"):
        load_adapter_arrays(tmp_path / "sealed" / "round-1")
    with pytest.raises(AtRestError, match="is plaintext, but an at-rest key is set"):
        load_adapter_arrays(tmp_path / "plain" / "round-1", at_rest=key)


def test_sealed_he_checkpoint_keeps_its_metadata(key: AtRestKey, tmp_path: Path) -> None:
    """The CKKS checkpoint sealed at rest round-trips whole, metadata included."""
    # Prepare
    packing = Packing(("a", "b"), ((2, 3), (4,)), 8)
    adapter = EncryptedAdapter([b"ciphertext-0", b"ciphertext-one"], 2.5, "k" * 16, packing)
    # Execute
    save_encrypted_adapter(tmp_path / "round-1", adapter, model="m", at_rest=key)
    back = load_encrypted_adapter(tmp_path / "round-1", at_rest=key)
    # Assert
    assert back == adapter
    assert sorted(p.name for p in (tmp_path / "round-1").iterdir()) == [ENCRYPTED_ADAPTER + SUFFIX]
    with pytest.raises(AtRestError, match="encrypted at rest"):
        load_encrypted_adapter(tmp_path / "round-1")


# -- ledgers ---------------------------------------------------------------------------------
def test_sealed_ledger_verifies_and_its_bytes_hold_no_field_names(
    key: AtRestKey, tmp_path: Path
) -> None:
    """The chain is over the plaintext records, so it verifies exactly as a plaintext one."""
    # Prepare
    ledger = _ledger(tmp_path / "ledger.jsonl", key)
    # Execute
    records = ledger.records()
    raw = ledger.path.read_bytes()
    # Assert
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert verify_chain(records) == [] and verify_records(records) == []
    for field in (b"noise_multiplier", b"epsilon", b"sample_rate", b"run_id", b"sha256"):
        assert field not in raw
    lines = raw.decode().splitlines()
    assert len(lines) == 3
    assert all(json.loads(line)["key-id"] == key.id for line in lines)


def test_sealed_ledger_records_swapped_within_the_ledger_are_detected(
    key: AtRestKey, tmp_path: Path
) -> None:
    """A sealed record is bound to its position: two swapped lines fail, naming the line."""
    ledger = _ledger(tmp_path / "ledger.jsonl", key)
    lines = ledger.path.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    ledger.path.write_text("".join(lines))
    with pytest.raises(AtRestError, match=r"ledger.jsonl: line 1 fails its AES-GCM integrity"):
        ledger.records()


def test_sealed_ledger_under_another_key_is_refused_and_left_intact(
    key: AtRestKey, other_key: AtRestKey, tmp_path: Path
) -> None:
    """Appending under the wrong key names both key ids and writes nothing."""
    path = tmp_path / "ledger.jsonl"
    _ledger(path, key)
    before = path.read_bytes()
    with pytest.raises(
        AtRestError,
        match=rf"line 1 was encrypted under at-rest key {key.id}, "
        rf"not {other_key.id}",
    ):
        Ledger(path, key=other_key).append(_spend(4))
    assert path.read_bytes() == before


def test_reading_a_sealed_ledger_without_a_key_fails_clearly(
    key: AtRestKey, tmp_path: Path
) -> None:
    """No key: a clear error naming the line and the key id, never garbage records; an
    append is refused before anything is written."""
    path = tmp_path / "ledger.jsonl"
    _ledger(path, key)
    before = path.read_bytes()
    with pytest.raises(AtRestError, match=rf"line 1 is encrypted at rest \(key {key.id}\)"):
        Ledger(path).records()
    with pytest.raises(AtRestError, match="encrypted at rest"):
        Ledger(path).append(_spend(4))
    assert path.read_bytes() == before


def test_a_plaintext_ledger_read_with_a_key_is_refused(key: AtRestKey, tmp_path: Path) -> None:
    """A key never silently accepts (or extends) a plaintext ledger."""
    path = tmp_path / "ledger.jsonl"
    _ledger(path, None)
    before = path.read_bytes()
    with pytest.raises(AtRestError, match=rf"line 1 is a plaintext record.*{key.id}"):
        Ledger(path, key=key).append(_spend(4))
    assert path.read_bytes() == before


def test_sealed_ledger_ignores_a_torn_last_line_and_heals_on_append(
    key: AtRestKey, tmp_path: Path
) -> None:
    """A crash mid-write of a sealed line: ignored, then cut by the next append."""
    ledger = _ledger(tmp_path / "ledger.jsonl", key, rounds=2)
    with open(ledger.path, "a", encoding="utf-8") as f:
        f.write('{"aes-256-gcm": "ZmVk')  # killed here
    assert len(ledger.records()) == 2
    ledger.append(_spend(3))
    records = ledger.records()
    assert [r["seq"] for r in records] == [1, 2, 3] and verify_chain(records) == []


def test_a_run_resumes_after_its_key_files_move_but_not_after_a_setting_changes(
    tmp_path: Path,
) -> None:
    from fedllm.config import parse_config
    from fedllm.errors import RunDirError
    from fedllm.rundir import RunDir

    base = {"run.output-dir": str(tmp_path), "run.name": "moved"}
    RunDir.create(parse_config({**base, "security.at-rest-key": str(tmp_path / "a.key")}), {})
    moved = {
        "security.at-rest-key": str(tmp_path / "vault" / "a.key"),
        "security.registry": str(tmp_path / "vault" / "registry.json"),
    }
    assert RunDir.find(parse_config({**base, **moved})) is not None
    with pytest.raises(RunDirError, match="different configuration"):
        RunDir.find(parse_config({**base, **moved, "security.sign-updates": True}))
