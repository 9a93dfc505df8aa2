"""The hash-chained ledger, its crash tolerance, and independent verification of every ε."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedllm.cli import main as cli
from fedllm.privacy.accounting import MECHANISMS, epsilon_report
from fedllm.privacy.ledger import (
    GENESIS,
    Ledger,
    LedgerError,
    dp_sgd_entry,
    record_hash,
    verify_chain,
)
from fedllm.privacy.verify import verify_records

STEP = (0.8, 0.05, 4)
DELTA = 1e-4


def _spend(history_len: int, *, site: int = 0) -> dict[str, object]:
    report = epsilon_report([STEP] * history_len, delta=DELTA)
    return dp_sgd_entry(
        run_id="r",
        server_round=history_len,
        site=site,
        noise_multiplier=STEP[0],
        sample_rate=STEP[1],
        steps=STEP[2],
        max_grad_norm=1.0,
        delta=DELTA,
        epsilons={m: float(report[m]) for m in MECHANISMS},
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    """A ledger with three rounds of one site's spend."""
    led = Ledger(tmp_path / "ledger.jsonl")
    for k in (1, 2, 3):
        led.append(_spend(k))
    return led


def test_records_chain_from_genesis_and_verify(ledger: Ledger) -> None:
    """Each record points at the previous one's hash; an honest ledger verifies clean."""
    # Execute
    records = ledger.records()
    # Assert
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_sha256"] == GENESIS
    assert records[1]["prev_sha256"] == records[0]["sha256"]
    assert verify_chain(records) == []
    assert verify_records(records) == []


def test_torn_last_line_is_ignored_and_cut_before_the_next_append(ledger: Ledger) -> None:
    """A crash mid-write (no final newline) leaves a ledger that parses; the next append heals."""
    # Prepare
    with open(ledger.path, "a", encoding="utf-8") as f:
        f.write('{"run_id": "r", "round": 4, "sit')  # killed here
    # Execute
    before = ledger.records()
    ledger.append(_spend(4))
    after = ledger.records()
    # Assert
    assert len(before) == 3
    assert [r["seq"] for r in after] == [1, 2, 3, 4]
    assert verify_records(after) == []


def test_an_edited_epsilon_is_named_by_record(ledger: Ledger) -> None:
    """Lowering a claimed ε is caught and the record named."""
    # Prepare
    records = ledger.records()
    records[1]["epsilon"]["prv"] = records[1]["epsilon"]["prv"] / 2
    # Execute
    problems = verify_records(records)
    # Assert
    assert any(p.startswith("record 2 (seq 2") and "sha256" in p for p in problems)
    assert any("claimed prv epsilon" in p for p in problems)


def test_an_edited_epsilon_is_caught_even_when_the_whole_chain_is_rehashed(
    ledger: Ledger,
) -> None:
    """Whoever rewrites the chain consistently after lowering an ε (new sha256 for that record,
    new links and hashes for every later one) passes the chain check, but not the recomputed
    ε: the claim no longer follows from the mechanism's parameters."""
    # Prepare
    records = ledger.records()
    records[1]["epsilon"]["prv"] = records[1]["epsilon"]["prv"] / 2
    previous = records[0]["sha256"]
    for record in records[1:]:
        record["prev_sha256"] = previous
        record["sha256"] = previous = record_hash(record)
    # Execute
    chain, problems = verify_chain(records), verify_records(records)
    # Assert
    assert chain == []
    assert [p for p in problems if "claimed prv epsilon" in p]
    assert all(p.startswith("record 2 (seq 2") for p in problems)


def test_a_deleted_record_breaks_the_chain(ledger: Ledger) -> None:
    """Removing a round's record is visible: the next record's prev_sha256 no longer matches."""
    # Prepare
    records = ledger.records()
    del records[1]
    # Execute
    problems = verify_chain(records)
    # Assert
    assert any("record 2 (seq 3)" in p and "prev_sha256" in p for p in problems)


def test_flipping_one_byte_in_the_file_fails_verification(ledger: Ledger) -> None:
    """One changed byte of the file makes verification fail on that record."""
    # Prepare
    data = bytearray(ledger.path.read_bytes())
    lines = data.split(b"\n")
    idx = lines[2].index(b'"max_grad_norm": 1.0')
    lines[2][idx + len(b'"max_grad_norm": ')] = ord("2")
    ledger.path.write_bytes(b"\n".join(lines))
    # Execute
    problems = verify_records(ledger.records())
    # Assert
    assert problems and all(p.startswith("record 3 (seq 3") for p in problems)


def test_a_line_that_is_not_json_is_an_error_naming_the_line(tmp_path: Path) -> None:
    """A corrupt middle line is reported with its line number, not skipped."""
    # Prepare
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"seq": 1}\nnot json\n{"seq": 3}\n')
    # Execute / Assert
    with pytest.raises(LedgerError, match="line 2 is not valid JSON"):
        Ledger(path).records()


def test_records_are_durable_json_lines(ledger: Ledger) -> None:
    """Every line is standalone JSON with the raw parameters needed to recompute ε."""
    # Execute
    lines = ledger.path.read_text().splitlines()
    # Assert
    for line in lines:
        record = json.loads(line)
        for key in ("noise_multiplier", "sample_rate", "steps", "delta", "max_grad_norm"):
            assert key in record
        assert record["guarantee"] == min(record["epsilon"]["prv"], record["epsilon"]["pld"])


def test_kill_9_at_any_moment_leaves_a_ledger_that_parses_and_continues(tmp_path: Path) -> None:
    """A writer process appending as fast as it can is SIGKILLed at random moments, six
    times; after every kill the ledger parses, its chain verifies with contiguous sequence
    numbers, and the next writer continues it."""
    # Prepare
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    path = tmp_path / "ledger.jsonl"
    writer = (
        "import sys; from pathlib import Path; from fedllm.privacy.ledger import Ledger\n"
        "ledger = Ledger(Path(sys.argv[1]))\n"
        "while True: ledger.append({'round': 1, 'site': 0, 'pad': 'x' * 4000})\n"
    )
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
        time.sleep(1.0 + float(rng.uniform(0.0, 0.5)))
        # Execute
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        records = Ledger(path).records()
        # Assert
        assert verify_chain(records) == []
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        counts.append(len(records))
    assert counts == sorted(counts) and counts[-1] > counts[0] > 0


def test_a_record_without_a_mechanism_is_refused_and_named(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """A chained, correctly hashed record that says no mechanism is not skipped: its ε could
    not be checked, so `verify_records` and `fedllm audit verify` fail naming its seq, site and
    round."""
    # Prepare
    entry = _spend(4, site=2)
    del entry["mechanism"]
    ledger.append(entry)
    # Execute
    problems = verify_records(ledger.records())
    code = cli(["audit", "verify", str(ledger.path.parent)])
    out = capsys.readouterr().out
    # Assert
    expected = "record 4 (seq 4, site 2, round 4): no mechanism field"
    assert [p for p in problems if p.startswith("record 4")] == [
        f"{expected}; a spend record must name its mechanism (dp-sgd or user-gaussian), or "
        "its epsilon cannot be checked."
    ]
    assert code == 1
    assert f"FAIL {ledger.path}: {expected}" in out
