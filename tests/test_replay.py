"""A round asked again is answered from the site's stored reply, and a spend stated again is
one ledger record (issue 18: a coordinator killed mid-round resumes without any site
training or spending twice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import Ledger, dp_sgd_entry
from fedllm.secure.at_rest import make_key_file
from fedllm.site_replay import REPLY_FILE, ReplyStore, StoredReply, request_digest

GLOBAL = {"a.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _digest(server_round: int = 1, arrays: dict[str, np.ndarray] = GLOBAL, **kw: object) -> str:
    fields = {"config_sha256": "c" * 64, "data_fingerprint": "d" * 64, "proximal_mu": 0.0}
    return request_digest(**{**fields, **kw}, server_round=server_round, arrays=arrays)


def _spend(server_round: int = 1) -> dict[str, object]:
    report = epsilon_report([(0.8, 0.05, 4)] * server_round, delta=1e-4)
    return dp_sgd_entry(
        run_id="r", server_round=server_round, site=0, noise_multiplier=0.8, sample_rate=0.05,
        steps=4, max_grad_norm=1.0, delta=1e-4, epsilons={m: report[m] for m in MECHANISMS},
    )  # fmt: skip


def _reply() -> StoredReply:
    update = {"a.lora_A.weight": np.full((2, 3), 0.5, dtype=np.float32)}
    metrics = {"num-examples": 12, "epsilon": float("inf"), "train-loss": np.float32(1.5)}
    return StoredReply(arrays=update, metrics=metrics, spend=_spend())


def test_the_same_request_gets_the_stored_reply_back(tmp_path: Path) -> None:
    # Prepare
    store = ReplyStore(path=tmp_path / REPLY_FILE, key=None)
    store.save(_digest(), _reply())
    # Execute
    got = store.load(_digest())
    # Assert
    assert got is not None
    np.testing.assert_array_equal(got.arrays["a.lora_A.weight"], 0.5)
    assert got.metrics["num-examples"] == 12 and got.metrics["epsilon"] == float("inf")
    assert got.spend == _spend()


@pytest.mark.parametrize(
    "changed",
    [
        {"server_round": 2},
        {"arrays": {"a.lora_A.weight": GLOBAL["a.lora_A.weight"] + 1e-7}},
        {"proximal_mu": 0.01},
        {"config_sha256": "e" * 64},
        {"data_fingerprint": "f" * 64},
    ],
    ids=["round", "global-adapter", "proximal-mu", "config", "data"],
)
def test_another_request_is_trained_afresh(tmp_path: Path, changed: dict[str, object]) -> None:
    # Prepare
    store = ReplyStore(path=tmp_path / REPLY_FILE, key=None)
    store.save(_digest(), _reply())
    # Execute / Assert
    assert store.load(_digest(**changed)) is None


def test_a_sealed_reply_opens_only_with_its_key_and_at_its_site(tmp_path: Path) -> None:
    # Prepare
    key = make_key_file(tmp_path / "k.key")
    other = make_key_file(tmp_path / "other.key")
    site0 = tmp_path / "site-0" / REPLY_FILE
    ReplyStore(path=site0, key=key).save(_digest(), _reply())
    site1 = tmp_path / "site-1" / REPLY_FILE
    site1.parent.mkdir()
    (site1.parent / (REPLY_FILE + ".aes")).write_bytes(
        (site0.parent / (REPLY_FILE + ".aes")).read_bytes()
    )
    # Execute / Assert
    assert not site0.exists()  # no plaintext update on disk
    assert ReplyStore(path=site0, key=key).load(_digest()) is not None
    assert ReplyStore(path=site0, key=other).load(_digest()) is None
    assert ReplyStore(path=site1, key=key).load(_digest()) is None  # bound to its site


def test_a_corrupt_reply_file_means_training_again(tmp_path: Path) -> None:
    # Prepare
    store = ReplyStore(path=tmp_path / REPLY_FILE, key=None)
    store.save(_digest(), _reply())
    (tmp_path / REPLY_FILE).write_bytes(b"PK\x03\x04 not a zip")
    # Execute / Assert
    assert store.load(_digest()) is None


def test_a_spend_stated_again_is_one_record_and_a_new_one_is_appended(tmp_path: Path) -> None:
    # Prepare
    ledger = Ledger(tmp_path / "ledger.jsonl")
    first = ledger.append(_spend(1))
    # Execute
    again = ledger.append_once(_spend(1))
    second = ledger.append_once(_spend(2))
    # Assert
    assert again == first
    assert [r["round"] for r in ledger.records()] == [1, 2]
    assert second["seq"] == 2
