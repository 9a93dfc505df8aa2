"""A site's privacy spend is durable at the site before the update it accounts for leaves.

The site's ClientApp runs in-process on a real train instruction (tiny model, real Opacus
DP-SGD, Flower's own mod chain); `os.fsync` is observed, not replaced, so every sync still
happens and the test sees what was on disk at each one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType

from clients.app import create_app
from fedllm import wire
from fedllm.config import parse_config
from fedllm.model import adapter_spec, init_adapter
from fedllm.rundir import RunDir

ROUND = 4


def train_instruction(
    overrides: dict[str, object], *, run_name: str | None = None, server_round: int = ROUND
) -> Message:
    """A train instruction as the coordinator sends it: the initial adapter, the round and
    (if given) the run name."""
    cfg = parse_config(overrides)
    spec = adapter_spec(cfg.model, cfg.lora)
    arrays = {n: a for n, a in init_adapter(spec, seed=0).items() if n in spec.sent}
    config = {wire.SERVER_ROUND: server_round, **({wire.RUN_NAME: run_name} if run_name else {})}
    content = RecordDict(
        {
            wire.CONFIG: ConfigRecord(config),
            wire.ARRAYS: wire.arrays_to_record(arrays),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="m-1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=0.0,
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def test_the_site_ledger_is_synced_with_the_rounds_spend_before_the_reply_is_returned(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the app hands its reply to Flower, the site's ledger has been fsync'd holding
    this round's spend, with the ε the reply reports, and nothing was written to it after."""
    # Prepare
    overrides = {
        "model.name": str(tiny_model_dir),
        "run.name": "order",
        "run.output-dir": str(tmp_path / "runs"),
        "privacy.mode": "record",
        "train.local-steps": 1,
        "train.batch-size": 8,
    }
    ledger = RunDir.site_ledger_path(tmp_path / "state" / "order", 0)
    synced: list[bytes | None] = []  # the ledger's bytes at each fsync of the ledger file
    real_fsync = os.fsync

    def observed_fsync(fd: int) -> None:
        real_fsync(fd)
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == ledger:
            synced.append(ledger.read_bytes())

    monkeypatch.setattr(os, "fsync", observed_fsync)
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "state")},
        state=RecordDict(),
        run_config={},
    )
    # Execute
    reply = create_app(overrides)(train_instruction(overrides), context)
    # Assert
    assert not reply.has_error(), reply.error
    on_disk = ledger.read_bytes()
    assert synced and synced[-1] == on_disk  # the last write was synced; none came after
    (record,) = [json.loads(line) for line in on_disk.decode().splitlines()]
    assert record["round"] == ROUND and record["site"] == 0
    reported = reply.content[wire.METRICS][wire.EPSILON]
    assert reported == pytest.approx(record["guarantee"]) and reported > 0
