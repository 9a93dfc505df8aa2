"""An append-only, hash-chained, fsync'd JSONL ledger of privacy spends.

Each record carries the SHA-256 of the previous record, so an auditor who holds the file can
detect any edit, deletion or reordering without trusting the operator. Records are written
one line at a time and fsync'd before the update they account for leaves the site. A crash
mid-write leaves at most a torn last line without a newline; readers ignore it (that spend
was never acknowledged) and the next append cuts it off first, so the ledger always parses.

A site signs each record it writes (`site_signature`: Ed25519 with its signing key over
the record's canonical JSON, position and previous hash included), so its ledger cannot be
rewritten consistently by anyone without the site's key, and a copy of the record that
travels in the run's ledger (`site_record`) is still the site's word. The signature is
inside what the record's own `sha256` covers.

With an at-rest key (`security.at-rest-key`) each line is the record sealed with AES-256-GCM,
`{"aes-256-gcm": <base64>, "key-id": <id>}`; the hash chain is still over the plaintext
records, so `verify_chain` and `fedllm audit verify` recompute exactly the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedllm.disk import fsync_path, writing
from fedllm.errors import FedllmError
from fedllm.secure.at_rest import AtRestError, AtRestKey, open_sealed, seal
from fedllm.secure.registry import public_key_id, public_pem

__all__ = [
    "DP_SGD",
    "SITE_RECORD",
    "SITE_SIGNATURE",
    "GENESIS",
    "MECHANISM_NAMES",
    "SEALED_FIELD",
    "USER_GAUSSIAN",
    "USER_SITE",
    "Ledger",
    "LedgerError",
    "dp_sgd_entry",
    "record_hash",
    "record_signer",
    "signed_body",
    "user_dp_entry",
    "verify_chain",
]

GENESIS = "0" * 64
DP_SGD = "dp-sgd"
USER_GAUSSIAN = "user-gaussian"
USER_SITE = "all"  # a user-level record protects every site alike
MECHANISM_NAMES = (DP_SGD, USER_GAUSSIAN)
SEALED_FIELD = "aes-256-gcm"  # the one field of a sealed line that matters
SITE_SIGNATURE = "site_signature"  # a site's Ed25519 signature on a record it wrote
SITE_RECORD = "site_record"  # in the run's ledger: the site's own signed record of a spend
_RECORD_CONTEXT = b"fedllm ledger record v1\n"

Signer = Callable[[bytes], dict[str, str]]


class LedgerError(FedllmError):
    """A ledger record is malformed or its hash chain is broken."""


def _canonical(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def signed_body(record: dict[str, Any]) -> bytes:
    """What a site's signature on a record covers: the record's canonical JSON without its
    `sha256` and its signature (its seq and prev_sha256 included: its place in the chain)."""
    body = {k: v for k, v in record.items() if k not in ("sha256", SITE_SIGNATURE)}
    return (
        _RECORD_CONTEXT
        + json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    )


def record_signer(key: Ed25519PrivateKey) -> Signer:
    """A signer for `Ledger.append`: the key's id and its Ed25519 signature, in hex."""
    key_id = public_key_id(public_pem(key))

    def sign(body: bytes) -> dict[str, str]:
        return {"key-id": key_id, "ed25519": key.sign(body).hex()}

    return sign


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON, its own `sha256` field excluded."""
    return hashlib.sha256(_canonical(record)).hexdigest()


def _record(text: str, where: str) -> dict[str, Any]:
    """One line's JSON object; anything else (bad JSON, nesting past Python's recursion
    limit, a number or a list) is not a record."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LedgerError(f"{where} is not valid JSON ({e.msg}).") from e
    except RecursionError as e:
        raise LedgerError(f"{where} is not a record (JSON nested too deep).") from e
    if not isinstance(value, dict):
        raise LedgerError(f"{where} is JSON but not a record (a {type(value).__name__}).")
    return value


def _record_aad(position: int) -> bytes:
    # A sealed record is bound to its place in the ledger, not to the file's path (a copy of
    # the run must still open): records swapped or moved within a ledger fail their integrity
    # check at once, naming the line. A record moved between ledgers is caught by the hash
    # chain over the plaintext (its prev_sha256), which binds every record to all before it.
    return f"fedllm ledger record|{position}".encode()


@dataclass
class Ledger:
    """One ledger file: the run's at the server, or a site's own; sealed under `key` if given."""

    path: Path
    key: AtRestKey | None = None
    signer: Signer | None = None  # a site's (`record_signer`): every record it appends is signed

    def _lines(self) -> Iterator[tuple[int, str]]:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        complete = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
        for number, raw in enumerate(complete.splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LedgerError(f"{self.path}: line {number} is not UTF-8 text.") from e
            if line.strip():
                yield number, line

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a torn last line is not a record).

        Raises `AtRestError` for a sealed line read without a key, a plaintext line read with
        one, or a sealed line that does not open (wrong key, tampered)."""
        out = []
        for position, (number, line) in enumerate(self._lines(), start=1):
            where = f"{self.path}: line {number}"
            stored = _record(line, where)
            sealed = SEALED_FIELD in stored
            if self.key is None and sealed:
                key_id = " ".join(str(stored.get("key-id", "?")).split())[:64]  # one line
                raise AtRestError(
                    f"{where} is encrypted at rest (key {key_id}); give its "
                    "key: security.at-rest-key, or --at-rest-key PATH."
                )
            if self.key is not None and not sealed:
                raise AtRestError(
                    f"{where} is a plaintext record, but the ledger is read with at-rest key "
                    f"{self.key.id} ({self.key.path}); refusing it (written without the key?)."
                )
            out.append(self._open(stored, position, where) if sealed else stored)
        return out

    def _open(self, stored: dict[str, Any], position: int, where: str) -> dict[str, Any]:
        assert self.key is not None
        try:
            blob = base64.b64decode(str(stored[SEALED_FIELD]), validate=True)
        except ValueError as e:  # binascii.Error, or a character outside ASCII
            raise AtRestError(f"{where} is not valid base64 ({e}): corrupt.") from e
        plain = open_sealed(self.key, blob, aad=_record_aad(position), what=where)
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LedgerError(f"{where} opens but is not a JSON record.") from e
        return _record(text, where)

    def _line(self, record: dict[str, Any]) -> str:
        """How a record is stored: its JSON, or that JSON sealed under the key."""
        text = json.dumps(record, sort_keys=True, allow_nan=False)
        if self.key is None:
            return text + "\n"
        blob = seal(self.key, text.encode(), aad=_record_aad(int(record["seq"])))
        sealed = {SEALED_FIELD: base64.b64encode(blob).decode("ascii"), "key-id": self.key.id}
        return json.dumps(sealed, sort_keys=True) + "\n"

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Chain `entry` to the last record, write it durably, and return the stored record;
        a failed write is a `DiskError` naming the ledger (what it wrote of the line is a
        torn tail, ignored)."""
        existing = self.records()  # first: a ledger this key cannot read is left untouched
        previous = existing[-1].get("sha256") if existing else GENESIS
        if not isinstance(previous, str):
            raise LedgerError(
                f"{self.path}: its last record has no sha256, so no record can chain to it."
            )
        record = {
            **entry,
            "seq": len(existing) + 1,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "prev_sha256": previous,
        }
        if self.signer is not None:
            record[SITE_SIGNATURE] = self.signer(signed_body(record))
        record["sha256"] = record_hash(record)
        line = self._line(record)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_torn_tail()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            fsync_path(self.path.parent)  # a new ledger's name must be durable too
        return record

    def holding(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """The last stored record that states `entry` field for field (None: no such record)."""
        wanted = json.loads(json.dumps(entry, allow_nan=False))  # as a stored record reads
        for record in reversed(self.records()):
            if all(record.get(k) == v for k, v in wanted.items()):
                return record
        return None

    def append_once(self, entry: dict[str, Any]) -> dict[str, Any]:
        """`append`, unless the ledger already holds this very entry; the stored record.

        A round redone because the coordinator died before it became durable states the
        same spend again (the same site record, the same parameters and cumulative ε): it is
        one spend, so it is one record. A spend that differs in any field is a new one."""
        return self.holding(entry) or self.append(entry)


def verify_chain(records: list[dict[str, Any]]) -> list[str]:
    """Problems with the hash chain, each naming the record (empty: the chain is intact)."""
    problems = []
    previous = GENESIS
    for index, record in enumerate(records, start=1):
        label = f"record {index} (seq {record.get('seq', '?')})"
        if record.get("seq") != index:
            problems.append(f"{label}: sequence number should be {index}.")
        if record.get("prev_sha256") != previous:
            problems.append(f"{label}: prev_sha256 does not match the record before it.")
        try:
            digest = record_hash(record)
        except (TypeError, ValueError):
            digest = None
        if record.get("sha256") != digest:
            problems.append(f"{label}: sha256 does not match its content (edited?).")
        previous = record.get("sha256", "")
    return problems


def _spend_entry(
    *,
    run_id: str,
    server_round: int,
    site: int | str,
    mechanism: str,
    level: str,
    neighbouring: str,
    sampling: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    epsilons: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "round": int(server_round),
        "site": site,
        "mechanism": mechanism,
        "level": level,
        "neighbouring": neighbouring,
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "sampling": sampling,
        "steps": int(steps),
        **extra,
        "delta": float(delta),
        "epsilon": {k: float(v) for k, v in epsilons.items()},
        "guarantee": min(float(epsilons["prv"]), float(epsilons["pld"])),
    }


def dp_sgd_entry(
    *,
    run_id: str,
    server_round: int,
    site: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    delta: float,
    epsilons: dict[str, float],
) -> dict[str, Any]:
    """One round of record-level DP-SGD at one site: raw parameters and cumulative ε.

    The raw parameters are enough to recompute every ε (`fedllm audit verify` does), so the
    ε fields are claims to check, not facts to trust.
    """
    return _spend_entry(
        run_id=run_id,
        server_round=server_round,
        site=int(site),
        mechanism=DP_SGD,
        level="record",
        neighbouring="add/remove one example",
        sampling="poisson",
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        max_grad_norm=float(max_grad_norm),
        delta=delta,
        epsilons=epsilons,
    )


def user_dp_entry(
    *,
    run_id: str,
    server_round: int,
    noise_multiplier: float,
    update_noise_multiplier: float,
    sample_rate: float,
    clip_norm: float,
    clipping: str,
    expected_sites: float,
    delta: float,
    epsilons: dict[str, float],
    sampling: str = "poisson (sites)",
    sampled_sites: Any = None,
    contributors: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """One round of user-level DP-FedAvg: one Poisson-sampled Gaussian step.

    `noise_multiplier` is the effective z the accountants compose (with adaptive clipping it
    covers both the update and the clipped-count query; with distributed noise under HE, the
    share of noise that actually reached the sum); `update_noise_multiplier` is the z_Δ
    applied to the sum of updates. `extra` records how the noise was made (e.g. by the sites).

    The record holds what the accountant needs and what the mechanism releases or treats as
    public (z, z_Δ, S, q, q·N, δ, ε), nothing about the sites: which sites were sampled and
    how many contributed are not DP-protected (one site added or removed changes them), and
    the accountant needs neither, so `sampled_sites` and `contributors` are accepted (callers
    written before they were withheld still pass them) and not recorded. Records written
    before may still carry them; every reader ignores them.
    """
    del sampled_sites, contributors  # withheld: see the docstring
    return _spend_entry(
        run_id=run_id,
        server_round=server_round,
        site=USER_SITE,
        mechanism=USER_GAUSSIAN,
        level="user",
        neighbouring="add/remove one site's whole dataset",
        sampling=sampling,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=1,
        update_noise_multiplier=float(update_noise_multiplier),
        clip_norm=float(clip_norm),
        clipping=clipping,
        expected_sites=float(expected_sites),
        **extra,
        delta=delta,
        epsilons=epsilons,
    )
