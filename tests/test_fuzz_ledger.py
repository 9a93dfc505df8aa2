"""Fuzzed privacy ledgers (issue 18): whatever bytes a ledger file holds, reading it gives
its records or one `FedllmError` line naming the file and line, and the audit's checks
(`verify_chain`, `verify_records`) report problems rather than raise; a ledger edited in
any way is refused or flagged, never read as an intact chain of other records."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fedllm.errors import FedllmError
from fedllm.privacy.ledger import GENESIS, Ledger, LedgerError, dp_sgd_entry, verify_chain
from fedllm.privacy.verify import verify_records
from fedllm.secure.at_rest import AtRestKey

# Not the accountants' figures (those take seconds to compute): the chain does not depend
# on them, and every test here that calls `verify_records` keeps it from recomputing any.
EPSILONS = {"rdp": 1.0, "prv": 0.9, "pld": 0.9}
_names = itertools.count()


def _entry(server_round: int) -> dict[str, Any]:
    return dp_sgd_entry(
        run_id="r",
        server_round=server_round,
        site=0,
        noise_multiplier=0.8,
        sample_rate=0.05,
        steps=4,
        max_grad_norm=1.0,
        delta=1e-4,
        epsilons=EPSILONS,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-ledger")


@pytest.fixture(scope="module")
def ledgers(folder: Path, at_rest_key: AtRestKey) -> dict[str, tuple[bytes, list[dict[str, Any]]]]:
    """A four-record ledger in plaintext and sealed at rest: its bytes and its records."""
    out = {}
    for kind, sealed_under in (("plain", None), ("sealed", at_rest_key)):
        ledger = Ledger(folder / f"{kind}.jsonl", key=sealed_under)
        for k in range(1, 5):
            ledger.append(_entry(k))
        out[kind] = (ledger.path.read_bytes(), ledger.records())
    return out


def _fresh(folder: Path, data: bytes) -> Path:
    path = folder / f"ledger-{next(_names)}.jsonl"
    path.write_bytes(data)
    return path


def _read(path: Path, key: AtRestKey | None) -> list[dict[str, Any]] | None:
    """The records, or None when the reader refused the file in one line naming it."""
    try:
        records = Ledger(path, key=key).records()
    except FedllmError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e), e
        return None
    assert all(isinstance(r, dict) for r in records)
    return records


def _problems(records: list[dict[str, Any]]) -> list[str]:
    problems = verify_records(records)
    assert all(isinstance(p, str) for p in problems)
    return problems


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_JSON = _SCALAR | st.lists(_SCALAR, max_size=2) | st.dictionaries(st.text(max_size=4), _SCALAR)


@given(st.binary(max_size=200), st.booleans())
@example(b"\xff\xfe\n", False)  # was UnicodeDecodeError from read_text
@example(b"5\n", False)  # was read as a record 5; verify_chain then raised AttributeError
@example(b"[" * 5000 + b"\n", False)  # was RecursionError from json.loads
@example(b'{"aes-256-gcm": 1, "key-id": "a\\nb"}\n', False)  # its error was two lines
@example(b'{"aes-256-gcm": "\\u0080"}\n', True)  # was ValueError from b64decode: not ASCII
def test_a_ledger_of_random_bytes_is_refused_in_one_line_or_read_as_records(
    folder: Path, at_rest_key: AtRestKey, data: bytes, sealed: bool
) -> None:
    records = _read(_fresh(folder, data), at_rest_key if sealed else None)
    if records:
        assert verify_chain(records) and _problems(records)  # no random record chains


# Values of the fields `verify_records` converts with float() and int() that were never
# plausible (so no accountant runs): each raised past the audit before.
_NEVER_PLAUSIBLE_STEPS = st.sampled_from(
    [0, -3, 0.5, float("inf"), float("-inf"), float("nan"), "x", None, [], {}]
)


@st.composite
def spend_like_records(draw: st.DrawFn) -> dict[str, Any]:
    """A record with the spend fields (each of any JSON value or dropped), and any others."""
    record = _entry(draw(st.integers(1, 3)))
    for field in sorted(record):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            del record[field]
        elif choice == 1:
            record[field] = draw(_JSON)
    record["steps"] = draw(_NEVER_PLAUSIBLE_STEPS)
    record.update(draw(st.dictionaries(st.text(max_size=6), _JSON, max_size=2)))
    return record


@given(st.lists(spend_like_records() | st.dictionaries(st.text(max_size=6), _JSON), max_size=3))
@example([{"seq": 1}])  # append then raised KeyError: 'sha256'
@example([{**_entry(1), "steps": float("inf")}])  # was OverflowError in plausible()
@example([{**_entry(1), "noise_multiplier": 10**400, "steps": 0}])  # OverflowError
@example([{**_entry(1), "epsilon": 5, "steps": 1, "site": 0}])  # AttributeError on 5.get
def test_records_of_the_wrong_schema_are_flagged_and_not_chained_onto(
    folder: Path, records: list[dict[str, Any]]
) -> None:
    # Prepare
    path = _fresh(folder, "".join(json.dumps(r) + "\n" for r in records).encode())
    # Execute
    read = _read(path, None)
    # Assert
    assert read is not None and json.dumps(read) == json.dumps(records)  # NaN != NaN
    if records:
        assert verify_chain(read) and _problems(read)
    try:
        appended = Ledger(path).append(_entry(9))
    except LedgerError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e), e
        return
    assert appended["prev_sha256"] == (records[-1]["sha256"] if records else GENESIS)


@st.composite
def edits(draw: st.DrawFn, data: bytes) -> bytes:
    """One edit of a ledger file: a bit flipped, bytes inserted, a cut, or a line dropped,
    repeated or two lines swapped."""
    kind = draw(st.sampled_from(["flip", "insert", "cut", "drop", "repeat", "swap"]))
    if kind in ("flip", "insert", "cut"):
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
        if kind == "insert":
            return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        return data[:at]
    lines = data.splitlines(keepends=True)
    i, j = draw(st.lists(st.integers(0, len(lines) - 1), min_size=2, max_size=2, unique=True))
    if kind == "drop":
        del lines[i]
    elif kind == "repeat":
        lines.insert(j, lines[i])
    else:
        lines[i], lines[j] = lines[j], lines[i]
    return b"".join(lines)


@given(st.sampled_from(["plain", "sealed"]), st.data())
def test_an_edited_ledger_is_refused_flagged_or_reads_as_the_records_it_held(
    folder: Path,
    at_rest_key: AtRestKey,
    ledgers: dict[str, tuple[bytes, list[dict[str, Any]]]],
    kind: str,
    data: st.DataObject,
) -> None:
    """An edit that leaves what the records say unchanged (JSON whitespace, `1e-05` for
    `1E-05`, a base64 bit no byte uses) reads as the records; a cut or a line dropped at the
    end reads as the records before it, since a torn last line is by design never a record
    (the run's manifest and `audit verify`'s cross-check catch a ledger cut short)."""
    # Prepare
    original, records = ledgers[kind]
    edited = data.draw(edits(original))
    # Execute
    read = _read(_fresh(folder, edited), at_rest_key if kind == "sealed" else None)
    # Assert
    if read is not None and verify_chain(read) == []:
        assert read == records[: len(read)]
